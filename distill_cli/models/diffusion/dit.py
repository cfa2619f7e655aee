"""`dit`: a small Diffusion Transformer backbone (Peebles & Xie 2023, DiT with adaLN-Zero) built
from the ViT `Block`s of `distill_cli/models/vit.py`, and its zoo builder returning a `Denoiser`.

net(x [B, C, H, W], time [B] float, y [B] int64 | None) -> [B, C, H, W]:

* patchify: conv (kernel = stride = p) -> tokens [B, N, D], N = (H/p)(W/p) row-major, plus DiT's
  FIXED 2-D sin-cos position embedding (a non-persistent buffer: recomputed, not learned);
* conditioning c [B, D] = time embedding (sinusoids of 256 dims, max period 10000, as DiT's
  TimestepEmbedder; any time scale) -> Linear -> SiLU -> Linear, + with `conditional` a class
  embedding of num_classes + 1 rows (the last the NULL label; y=None means it). An unconditional
  net has no class embedding and ignores y. No label dropout here (the objective's job);
* `depth` blocks: each wraps a `vit.Block` (reused as is: its LayerNorms keep their affine
  parameters, which adaLN's shift/scale make redundant but harmless) with adaLN-Zero:
  (shift, scale, gate) x 2 = Linear(SiLU(c)); x + gate1 * attn(LN1(x) * (1 + scale1) + shift1),
  then the same around the MLP;
* `out`: LayerNorm (no affine) modulated by (shift, scale) = Linear(SiLU(c)), Linear to p*p*C,
  unpatchify to [B, C, H, W].
* Init as DiT: Linear weights Xavier-uniform with zero biases, the patch conv Xavier on its
  flattened weight, time MLP and class embedding N(0, 0.02); with `zero_init` (adaLN-Zero) every
  modulation Linear and `out`'s Linear start at zero, so every block starts as the identity and a
  fresh net outputs exactly 0 (zero_init=false: they keep the Xavier init).

`patch_size` null picks 2 for inputs smaller than 16 px (8x8 digits: 16 tokens) and 4 otherwise
(28 px: 49 tokens, 32 px: 64). Zoo contract (of the backbone; the `Denoiser` prefixes "net."):
`stages` = the residual stream [B, N, D] after the last block of each stage (`blocks.<i>`, the
vit stage grouping `vit.stage_ends`), `grid_size` the patch grid, `feature_dim` = D, `out` the
output layer (`classifier`).
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.models import vit
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.unet import (
    batch_time,
    check_common,
    option_error,
    timestep_embedding,
)
from distill_cli.models.registry import register

TIME_FREQS = 256  # DiT's frequency_embedding_size


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """[N, dim] DiT/MAE 2-D position embedding: half the dims encode the column (x), half the row
    (y), each as 1-D sin-cos; row-major over the grid."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """A `vit.Block` with adaLN-Zero modulation around its attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.block = vit.Block(dim, heads, mlp_ratio, dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        b = self.block
        x = x + gate1[:, None] * b.attn(modulate(b.norm1(x), shift1, scale1))
        return x + gate2[:, None] * b.mlp(modulate(b.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """x [B, C, H, W], time [B], y [B] | None -> [B, C, H, W]; see the module docstring."""

    def __init__(self, in_channels: int, grid: tuple[int, int], patch_size: int,
                 num_classes: int, conditional: bool, dim: int = 96, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 zero_init: bool = True):
        super().__init__()
        self.in_channels, self.grid_size, self.patch_size = in_channels, tuple(grid), patch_size
        self.num_classes, self.conditional = num_classes, conditional
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(dim, grid)[None], persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQS, dim), nn.SiLU(),
                                        nn.Linear(dim, dim))
        self.class_embed = nn.Embedding(num_classes + 1, dim) if conditional else None
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio, dropout)
                                    for _ in range(depth))
        self.out = FinalLayer(dim, patch_size, in_channels)
        self._init(zero_init)
        self.stages = tuple(f"blocks.{e - 1}" for e in vit.stage_ends(depth))
        self.feature_dim = dim
        self.classifier = "out"

    def _init(self, zero_init: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        if zero_init:
            for lin in [blk.ada[-1] for blk in self.blocks] + [self.out.ada[-1], self.out.linear]:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, time, y: torch.Tensor | None = None) -> torch.Tensor:
        p, (gh, gw) = self.patch_size, self.grid_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, gh * p, gw * p):
            raise ValueError(f"dit was built for [B, {self.in_channels}, {gh * p}, {gw * p}] "
                             f"images (its position embedding is fixed), got {tuple(x.shape)}")
        c = self.time_embed(timestep_embedding(batch_time(time, x), TIME_FREQS))
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.class_embed(y)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        for block in self.blocks:
            h = block(h, c)
        h = self.out(h, c)  # [B, N, p*p*C]
        b, c_in = x.shape[0], self.in_channels
        h = h.reshape(b, gh, gw, p, p, c_in).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c_in, gh * p, gw * p)


@register("dit")
def dit(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
        process="vp_cosine", param: str = "v", sampler: str = "auto", steps: int = 32,
        conditional: bool = False, guidance: float = 1.0, sigma_data: float = 0.5,
        patch_size: int | None = None, dim: int = 96, depth: int = 6, heads: int = 3,
        mlp_ratio: float = 4.0, dropout: float = 0.0, zero_init: bool = True) -> Denoiser:
    """A `Denoiser` around a `DiT` sized for [B, in_channels, *input_size] images."""
    check_common("dit", num_classes, dropout)
    if patch_size is None:
        patch_size = 2 if min(int(s) for s in input_size) < 16 else 4
    grid = vit.patch_grid("dit", input_size, int(patch_size))
    dim, depth, heads = int(dim), int(depth), int(heads)
    if depth < 1:
        raise option_error("dit", f"depth={depth}", "depth", "to 1 or more")
    if heads < 1 or dim % heads:
        raise option_error("dit", f"dim={dim} is not divisible by heads={heads}", "heads",
                            "to a divisor of dim, e.g. dim=96 heads=3")
    if dim < 4 or dim % 4:
        raise option_error("dit", f"dim={dim} is not a multiple of 4 (the 2-D sin-cos position "
                            f"embedding splits it in quarters)", "dim", "to a multiple of 4")
    net = DiT(int(in_channels), grid, int(patch_size), int(num_classes), bool(conditional), dim,
              depth, heads, float(mlp_ratio), float(dropout), bool(zero_init))
    return Denoiser(net, process=process, param=param, num_classes=int(num_classes),
                    conditional=bool(conditional), sampler=sampler, steps=int(steps),
                    guidance=float(guidance), sigma_data=float(sigma_data),
                    stages=net.stages, feature_dim=net.feature_dim)
