"""`mixer`: an MLP-Mixer (Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for
Vision") for 8-32 px images.

[B, C, H, W] -> per-patch linear embedding (conv, kernel = stride = p) -> tokens [B, N, D]
(N = (H/p)*(W/p), row-major) -> `depth` Mixer blocks -> final LayerNorm `norm` -> mean over the
N tokens [B, D] -> `fc` [B, num_classes]. A Mixer block (paper eq. 1), with MLP = Linear-GELU-
Linear:
    x = x + TokenMLP(LN(x)^T)^T      # mixes the N tokens, per channel: N -> token_mlp_dim -> N
    x = x + ChannelMLP(LN(x))        # mixes the D channels, per token: D -> channel_mlp_dim -> D
No position embedding: the token MLP is itself position-specific, so N is fixed at build time and
inputs must have the build-time size.

Stages follow the token models' convention of `vit.py` (same `stage_ends` grouping: depth 6 ->
stages after blocks 2, 4, 6): `[B, N, D]` tokens row-major over `grid_size`, the last stage is
`norm`, the tokens that are mean-pooled into `fc`.

Choices: defaults scale Mixer-S/16 (D 512, token 256, channel 2048, depth 8) down to a 2-core CPU
while keeping its ratios (token_mlp_dim = D/2, channel_mlp_dim = 4D): D 128, 64, 512; depth 6 to
match `vit_tiny`'s three stages; ~0.84M parameters at 28 px / patch 4. Init: Linear weights
truncated-normal std 0.02 with zero biases, as `vit_tiny` (the paper zero-initialises the head;
we do not, so both token models start alike), the patch conv PyTorch's default.
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.registry import register
from distill_cli.models.vit import init_linear_, patch_grid, stage_ends


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_mlp_dim: int, channel_mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = mlp(tokens, token_mlp_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = mlp(dim, channel_mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """[B, in_channels, H, W] -> logits; stages `blocks.<i>`..., `norm` (tokens [B, N, D])."""

    def __init__(self, num_classes: int, in_channels: int, grid: tuple[int, int],
                 patch_size: int, dim: int, depth: int, token_mlp_dim: int,
                 channel_mlp_dim: int):
        super().__init__()
        tokens = grid[0] * grid[1]
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim, token_mlp_dim, channel_mlp_dim)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        init_linear_(self)
        self.grid_size = grid
        self.stages = tuple(f"blocks.{e - 1}" for e in stage_ends(depth)[:-1]) + ("norm",)
        self.feature_dim = dim
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x).mean(dim=1))


@register("mixer")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          patch_size: int = 4, dim: int = 128, depth: int = 6, token_mlp_dim: int = 64,
          channel_mlp_dim: int = 512) -> Mixer:
    grid = patch_grid("mixer", input_size, int(patch_size))
    for key, value in (("dim", dim), ("depth", depth), ("token_mlp_dim", token_mlp_dim),
                       ("channel_mlp_dim", channel_mlp_dim)):
        if int(value) < 1:
            raise UserError(f"Architecture 'mixer': {key}={value}", key=key,
                            fix=f"set student.{key} (or teacher.{key}) to 1 or more")
    return Mixer(num_classes, in_channels, grid, int(patch_size), int(dim), int(depth),
                 int(token_mlp_dim), int(channel_mlp_dim))
