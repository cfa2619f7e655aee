"""Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021; METHODS_FAMILIES C2).

Source: VICO-UoE/DatasetCondensation@53f63a6 utils.py:474-650 (`ParamDiffAug`, `DiffAugment`,
`rand_*`). What we match:

* mode 'S' (their default): each call picks ONE family uniformly from the strategy string
  (`color_crop_cutout_flip_scale_rotate`) and applies all of that family's functions;
* ranges (ParamDiffAug): scale sx, sy ~ U[1/1.2, 1.2] independently; rotate theta ~ U[-15, 15]
  degrees, matrix [[cos, -sin, 0], [sin, cos, 0]]; both via `affine_grid` + `grid_sample`
  (bilinear, zero padding, align_corners=False: what their calls do under PyTorch >= 1.3);
  flip (last axis) with probability 0.5; color = brightness x + (b - 0.5), then saturation
  (x - m) * 2s + m with m the per-pixel channel mean, then contrast (x - m) * (c + 0.5) + m with
  m the per-image mean, b, s, c ~ U[0, 1]; crop = an integer translation by up to
  int(0.125 * size + 0.5) pixels per axis with zero fill; cutout = zero a square of side
  int(0.5 * size + 0.5) whose centre is uniform in [0, size + 1 - side % 2) (clipped at the
  borders; their index arithmetic reproduced).
* Siamese: their code re-seeds the global RNG and copies the first image's parameters to the
  whole batch. We sample explicitly instead (the advice in C2): `sample(..., n=1)` once, then
  `apply` the SAME parameters to the real and the synthetic batch (n=1 broadcasts).

Deviation: draws come from a CPU `torch.Generator` the caller seeds (never the global RNG or
the clock), so a step is a pure function of its seed. Everything is differentiable in `x`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError

STRATEGY_DEFAULT = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

# ParamDiffAug (utils.py:474-485)
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


@dataclass(frozen=True)
class DSAParams:
    """One family's parameters for `n` images of `height` x `width` (family "" = identity).

    `values` holds CPU tensors with a leading dimension n: color: brightness, saturation,
    contrast (float64 in [0, 1)); crop: shift_h, shift_w (int64); cutout: centre_h, centre_w
    (int64); flip: flip (bool); scale: sx, sy (float64); rotate: angle (float64, radians).
    """
    family: str
    n: int
    height: int
    width: int
    values: dict = field(default_factory=dict)


def families(strategy: str, key: str = "dsa_strategy") -> tuple[str, ...]:
    """The families of a strategy string ("" / "none" -> ()). Unknown names are a user error
    naming `key` (call it when the config is read to fail early)."""
    if strategy is None or str(strategy).strip().lower() in ("", "none"):
        return ()
    names = tuple(str(strategy).strip().split("_"))
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise UserError(f"Unknown DSA augmentation {', '.join(map(repr, bad))} in "
                        f"{strategy!r}", key=key,
                        fix=f"join any of {', '.join(FAMILIES)} with '_' (the authors' CIFAR "
                            f"default: {STRATEGY_DEFAULT}; no flip for digits), or '' for none")
    return names


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def sample(strategy: str, n: int, generator: torch.Generator, height: int,
           width: int) -> DSAParams:
    """Mode 'S': one family drawn uniformly from `strategy`, and its parameters for `n` images
    (n=1 for a Siamese pair: apply the result to both batches)."""
    names = families(strategy)
    n, height, width = int(n), int(height), int(width)
    if not names:
        return DSAParams("", n, height, width)
    family = names[int(torch.randint(len(names), (1,), generator=generator))]
    if family == "color":
        values = {"brightness": _uniform(n, generator), "saturation": _uniform(n, generator),
                  "contrast": _uniform(n, generator)}
    elif family == "crop":
        sh, sw = int(height * RATIO_CROP_PAD + 0.5), int(width * RATIO_CROP_PAD + 0.5)
        values = {"shift_h": torch.randint(-sh, sh + 1, (n,), generator=generator),
                  "shift_w": torch.randint(-sw, sw + 1, (n,), generator=generator)}
    elif family == "cutout":
        ch, cw = _cutout_size(height, width)
        values = {"centre_h": torch.randint(0, height + 1 - ch % 2, (n,), generator=generator),
                  "centre_w": torch.randint(0, width + 1 - cw % 2, (n,), generator=generator)}
    elif family == "flip":
        values = {"flip": _uniform(n, generator) < PROB_FLIP}
    elif family == "scale":
        lo = 1.0 / RATIO_SCALE
        values = {"sx": _uniform(n, generator) * (RATIO_SCALE - lo) + lo,
                  "sy": _uniform(n, generator) * (RATIO_SCALE - lo) + lo}
    else:  # rotate
        values = {"angle": (_uniform(n, generator) - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi}
    return DSAParams(family, n, height, width, values)


def _cutout_size(height: int, width: int) -> tuple[int, int]:
    return int(height * RATIO_CUTOUT + 0.5), int(width * RATIO_CUTOUT + 0.5)


def _per_image(v: torch.Tensor, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A [n] parameter as [n, 1, 1, 1] on x's device (n=1 broadcasts over the batch)."""
    return v.to(device=x.device, dtype=dtype or x.dtype).view(-1, 1, 1, 1)


def apply(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """`x` [B, C, H, W] transformed by `params` (sampled for n == B, or n == 1 for the same
    transform on every image). Differentiable in `x`."""
    if not params.family:
        return x
    if x.dim() != 4:
        raise ValueError(f"DSA needs [B, C, H, W] images, got shape {tuple(x.shape)}")
    if params.n not in (1, x.shape[0]):
        raise ValueError(f"DSA parameters for {params.n} images cannot be applied to a batch of "
                         f"{x.shape[0]} (sample n=1 for a Siamese pair, or n=len(x))")
    if (params.height, params.width) != tuple(x.shape[2:]):
        raise ValueError(f"DSA parameters sampled for {params.height}x{params.width} images, "
                         f"got {tuple(x.shape[2:])}")
    v = params.values
    if params.family == "color":
        x = x + (_per_image(v["brightness"], x) - 0.5) * BRIGHTNESS
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_per_image(v["saturation"], x) * SATURATION) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (_per_image(v["contrast"], x) + CONTRAST) + mean
    if params.family == "flip":
        return torch.where(_per_image(v["flip"], x, torch.bool), x.flip(3), x)
    if params.family == "crop":
        return _translate(x, v["shift_h"], v["shift_w"])
    if params.family == "cutout":
        return _cutout(x, v["centre_h"], v["centre_w"])
    if params.family == "scale":
        zero = torch.zeros_like(v["sx"])
        theta = torch.stack([torch.stack([v["sx"], zero, zero], -1),
                             torch.stack([zero, v["sy"], zero], -1)], 1)
    else:  # rotate
        a = v["angle"]
        zero = torch.zeros_like(a)
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], -1),
                             torch.stack([a.sin(), a.cos(), zero], -1)], 1)
    return _warp(x, theta)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]], zero outside the image (the
    authors' pad-1-and-clamp indexing reads a zero border for any out-of-range index)."""
    b, _, h, w = x.shape
    dev = x.device
    sh = shift_h.to(dev).expand(b).view(b, 1, 1)
    sw = shift_w.to(dev).expand(b).view(b, 1, 1)
    # zero-pad by one and clamp indices into the padded border, as theirs
    rows = (torch.arange(h, device=dev).view(1, h, 1) + sh + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=dev).view(1, 1, w) + sw + 1).clamp(0, w + 1)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)      # [B, H+2, W+2, C]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)      # [B, C, H, W]


def _cutout(x: torch.Tensor, centre_h: torch.Tensor, centre_w: torch.Tensor) -> torch.Tensor:
    """Zero the rows [c - side//2, c - side//2 + side) x columns likewise, clipped (theirs)."""
    b, _, h, w = x.shape
    dev = x.device
    ch, cw = _cutout_size(h, w)
    top = (centre_h.to(dev).expand(b) - ch // 2).view(b, 1)
    left = (centre_w.to(dev).expand(b) - cw // 2).view(b, 1)
    r = torch.arange(h, device=dev).view(1, h)
    c = torch.arange(w, device=dev).view(1, w)
    in_rows = (r >= top) & (r < top + ch)                      # [B, H]
    in_cols = (c >= left) & (c < left + cw)                    # [B, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])        # [B, H, W]
    return x * keep.unsqueeze(1).to(x.dtype)


def augment(x: torch.Tensor, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Per-image augmentation (the authors' seed=-1 mode: network training, evaluation, MTT's
    unroll): one family for the call, independent parameters for every image."""
    if not families(strategy):
        return x
    return apply(x, sample(strategy, x.shape[0], generator, x.shape[2], x.shape[3]))
