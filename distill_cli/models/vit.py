"""`vit_tiny`: a small Vision Transformer for 8-32 px images (Dosovitskiy et al. 2021; DeiT,
Touvron et al. 2021, for the tiny width/head count), without a CLS token.

[B, C, H, W] -> patch_embed (conv, kernel = stride = p) [B, D, H/p, W/p] -> tokens [B, N, D]
(N = (H/p)*(W/p), row-major over the patch grid) + learned position embedding -> `depth` pre-norm
blocks (x + MHSA(LN(x)); x + MLP(LN(x))) -> final LayerNorm `norm` -> mean over the N tokens
[B, D] -> `fc` [B, num_classes].

Token models' STAGE CONVENTION (shared with `mixer`; feature methods rely on it): every stage
output is a token tensor `[B, N, D]`, row-major over the `grid_size = (H/p, W/p)` patch grid (a
sqrt(N) x sqrt(N) grid for square inputs), no CLS token. The blocks are grouped into up to 4
stages of equal depth (`stage_ends`): depth 6 -> stages end after blocks 2, 4, 6; depth 8 or 12
-> 4 stages; 1-4 -> one block a stage. The earlier stages are the residual stream after their last
block (`blocks.<i>`); the LAST stage is `norm`, the final LayerNorm's output, i.e. exactly the
tokens that are mean-pooled into `fc` (so `fc(tap.mean(1))` reproduces the logits).

Choices: `dim` 96 (DeiT-tiny: 192) because attention/MLP cost grows with dim^2 and these models
train on a 2-core CPU: depth 6 at 96 is ~0.7M parameters, the size of the CIFAR ResNet students;
`heads` 3 as DeiT-tiny (head width 32). `dropout` (timm's drop_rate) acts on the embedded tokens,
the attention output projection and both MLP layers; attention probabilities are not dropped
(timm's default attn_drop 0). Init as timm's ViT: Linear weights and the position embedding
truncated-normal std 0.02, zero biases, LayerNorm 1/0, the patch conv PyTorch's default.
The position embedding is learned for the build-time input size, so inputs must have that size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.registry import register


def stage_ends(depth: int) -> list[int]:
    """1-based index of the last block of each stage: the largest stage count s <= 4 that divides
    `depth` (equal-depth stages); depths with no divisor in 2..4 (5, 7, 11, ...) take
    min(4, depth) stages of near-equal depth, stage i ending after block ceil((i+1)*depth/s)."""
    s = next((k for k in (4, 3, 2) if depth % k == 0), 1)
    if s == 1 and depth > 1:
        s = min(4, depth)
    return [math.ceil((i + 1) * depth / s) for i in range(s)]


def patch_grid(arch: str, input_size: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """(H/p, W/p), or a UserError naming the option when p does not tile the input."""
    h, w = (int(s) for s in input_size)
    if patch_size < 1 or h % patch_size or w % patch_size:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise UserError(
            f"Architecture {arch!r}: patch_size={patch_size} does not tile {h}x{w} inputs",
            key="patch_size",
            fix=f"set student.patch_size (or teacher.patch_size) to one of "
                f"{', '.join(map(str, divisors))}")
    return h // patch_size, w // patch_size


def init_linear_(model: nn.Module) -> None:
    """timm's ViT init: Linear weights trunc-normal std 0.02 and zero biases (LayerNorm 1/0 and
    the conv's PyTorch default are left as built)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # with bias, as timm (qkv_bias=True)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d/heads], scale 1/sqrt(.)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


def mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """[B, in_channels, H, W] -> logits; stages `blocks.<i>`..., `norm` (tokens [B, N, D])."""

    def __init__(self, num_classes: int, in_channels: int, grid: tuple[int, int],
                 patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                 dropout: float):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        init_linear_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.grid_size = grid
        self.stages = tuple(f"blocks.{e - 1}" for e in stage_ends(depth)[:-1]) + ("norm",)
        self.feature_dim = dim
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x).mean(dim=1))


@register("vit_tiny")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          patch_size: int = 4, dim: int = 96, depth: int = 6, heads: int = 3,
          mlp_ratio: float = 4.0, dropout: float = 0.0) -> ViT:
    grid = patch_grid("vit_tiny", input_size, int(patch_size))
    if int(depth) < 1:
        raise UserError(f"Architecture 'vit_tiny': depth={depth}", key="depth",
                        fix="set student.depth (or teacher.depth) to 1 or more")
    if int(heads) < 1 or int(dim) % int(heads):
        raise UserError(f"Architecture 'vit_tiny': dim={dim} is not divisible by heads={heads}",
                        key="heads", fix="set student.heads (or teacher.heads) to a divisor of "
                                         "dim, e.g. dim=96 heads=3")
    return ViT(num_classes, in_channels, grid, int(patch_size), int(dim), int(depth), int(heads),
               float(mlp_ratio), float(dropout))
