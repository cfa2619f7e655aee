"""Images as one picture: a rows-by-columns grid, de-normalised to pixels and clipped to [0, 1]
— a synthetic set (row = class, column = its j-th image) or a generator's samples (row = step
count, column = a fixed noise).

Small images are repeated (nearest neighbour) so each cell is at least `MIN_CELL` pixels along
each side: an 8x8 digit becomes 32x32, a 1x40 signal a 32x40 strip. Cells are separated by
`PAD` white pixels (torchvision's `make_grid` layout, drawn here so a 1-image set is
padded too). Grey images (C=1) are drawn grey; sets with
channel counts other than 1 or 3 are drawn as their channel mean.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from distill_cli.io import atomic_write_bytes

MIN_CELL = 32   # pixels per cell side, at least
PAD = 2         # pixels between cells


def grid_tensor(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                rows: int, cols: int) -> torch.Tensor:
    """float32 `[3, H', W']` in [0, 1] (what W&B's image logging takes); `images` are
    `[rows*cols, C, H, W]` (or `[N, C, L]`) normalised images, row-major."""
    x = images.detach().to("cpu", torch.float32)
    if x.dim() == 3:                      # 1-D signals: one row of pixels each
        x = x.unsqueeze(2)
    if x.dim() != 4 or x.shape[0] != rows * cols:
        raise ValueError(f"expected [rows*cols={rows * cols}, C, H, W] images, got "
                         f"{tuple(images.shape)}")
    c = x.shape[1]
    view = (1, c, 1, 1)
    x = x * torch.tensor([float(s) for s in std]).view(view) \
        + torch.tensor([float(m) for m in mean]).view(view)
    x = x.clamp(0.0, 1.0)
    if c not in (1, 3):
        x = x.mean(1, keepdim=True)
    sh, sw = (max(1, math.ceil(MIN_CELL / s)) for s in x.shape[2:])
    x = x.repeat_interleave(sh, dim=2).repeat_interleave(sw, dim=3)   # nearest upscale
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[2] + PAD, x.shape[3] + PAD
    # make_grid's layout (PAD white pixels around every cell), also for a single image, which
    # make_grid would return unpadded
    grid = torch.ones(3, rows * h + PAD, cols * w + PAD)
    cells = x.reshape(rows, cols, 3, h - PAD, w - PAD)
    for c in range(rows):
        for j in range(cols):
            grid[:, PAD + c * h:(c + 1) * h, PAD + j * w:(j + 1) * w] = cells[c, j]
    return grid


def save_grid(path, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              rows: int, cols: int) -> Path:
    """Write the grid as an RGB PNG at `path`, atomically; returns the path."""
    from PIL import Image

    grid = grid_tensor(images, mean, std, rows, cols)
    # torchvision's save_image rounding: x*255 + 0.5, truncated
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return path
