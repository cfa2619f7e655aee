"""Whole-batch tensor augmentation and normalisation for in-memory data.

Everything here works on a batch at once, on whatever device the batch lives on: random crops are
a zero-pad followed by two `gather`s (index arithmetic, no per-sample Python loop), flips are a
`torch.where` between the batch and its mirror. The random parameters are small CPU tensors drawn
from an explicit `torch.Generator` (so they are a pure function of its seed) and then moved to the
batch's device.

Layouts: images are `[B, C, H, W]`; 1-D signals `[B, C, L]` (crop and flip act along `L`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError

_AUGMENT_KEYS = ("crop_padding", "hflip", "random_resized_crop")


@dataclass(frozen=True)
class AugmentSpec:
    """What the training split does to each batch.

    crop_padding: zero-pad each side by this many pixels, then take a random crop of the original
        size (the classic CIFAR "crop 32, padding 4"); 0 = no crop.
    hflip: mirror each sample left-right with probability 1/2.
    random_resized_crop: only used by `imagefolder` when streamed from disk (LoaderSplit:
        torchvision RandomResizedCrop); ignored by in-memory splits.
    """

    crop_padding: int = 0
    hflip: bool = False
    random_resized_crop: bool = False

    @property
    def enabled(self) -> bool:
        """Whether an in-memory batch is changed at all."""
        return self.crop_padding > 0 or self.hflip

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg, key: str = "dataset.augment", default: "AugmentSpec | None" = None
                    ) -> "AugmentSpec":
        """Build from a dict / DictConfig / None (None -> `default`, or no augmentation).

        Keys that are absent keep `default`'s value, so `augment: {hflip: false}` only turns the
        flip off. Unknown keys and bad values raise `UserError` naming `key`.
        """
        base = default if default is not None else cls()
        if cfg is None:
            return base
        if isinstance(cfg, AugmentSpec):
            return cfg
        if not isinstance(cfg, Mapping):
            try:  # omegaconf DictConfig is a MutableMapping, but be lenient with look-alikes
                cfg = dict(cfg)
            except Exception:
                raise UserError(f"`{key}` must be a mapping like {{crop_padding: 4, hflip: true}}, "
                                f"got {cfg!r}", key=key) from None
        unknown = sorted(set(map(str, cfg.keys())) - set(_AUGMENT_KEYS))
        if unknown:
            raise UserError(f"unknown augmentation option(s) {unknown}", key=key,
                            fix=f"Use only {list(_AUGMENT_KEYS)}")
        values = base.as_dict()
        if "crop_padding" in cfg and cfg["crop_padding"] is not None:
            pad = cfg["crop_padding"]
            if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
                raise UserError(f"crop_padding must be an integer >= 0, got {pad!r}",
                                key=f"{key}.crop_padding", fix="Use 0 for no crop, 4 for CIFAR-style")
            values["crop_padding"] = int(pad)
        for flag in ("hflip", "random_resized_crop"):
            if flag in cfg and cfg[flag] is not None:
                if not isinstance(cfg[flag], bool):
                    raise UserError(f"{flag} must be true or false, got {cfg[flag]!r}",
                                    key=f"{key}.{flag}")
                values[flag] = bool(cfg[flag])
        return cls(**values)


def _as_4d(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dim() == 4:
        return x, False
    if x.dim() == 3:
        return x.unsqueeze(2), True  # [B, C, L] -> [B, C, 1, L]
    raise ValueError(f"expected a [B,C,H,W] or [B,C,L] batch, got shape {tuple(x.shape)}")


def pad_crop(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to the original size at per-sample offsets.

    `top`/`left` are int64 `[B]` offsets into the padded batch, in `[0, 2*padding]`; `top` is
    ignored for 1-D signals. `top = left = padding` returns `x` unchanged.
    """
    if padding <= 0:
        return x
    x4, one_d = _as_4d(x)
    b, c, h, w = x4.shape
    pad_h = 0 if one_d else padding
    padded = F.pad(x4, (padding, padding, pad_h, pad_h))  # zeros, any dtype
    dev = x.device
    top = top.to(dev) if not one_d else torch.zeros(b, dtype=torch.long, device=dev)
    left = left.to(dev)
    rows = top[:, None] + torch.arange(h, device=dev)[None, :]        # [B, H]
    cols = left[:, None] + torch.arange(w, device=dev)[None, :]       # [B, W]
    wp = padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, wp))  # [B, C, H, Wp]
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))      # [B, C, H, W]
    return out.squeeze(2) if one_d else out


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where `mask` ([B] bool) is true along the last axis."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(mask.to(x.device).view(shape), x.flip(-1), x)


def sample_params(spec: AugmentSpec, batch_size: int, generator: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """Draw the batch's random parameters on the CPU, in a fixed order (top, left, flip)."""
    params: dict[str, torch.Tensor] = {}
    if spec.crop_padding > 0:
        hi = 2 * spec.crop_padding + 1
        params["top"] = torch.randint(0, hi, (batch_size,), generator=generator)
        params["left"] = torch.randint(0, hi, (batch_size,), generator=generator)
    if spec.hflip:
        params["flip"] = torch.rand(batch_size, generator=generator) < 0.5
    return params


def apply_params(x: torch.Tensor, spec: AugmentSpec, params: dict[str, torch.Tensor]) -> torch.Tensor:
    if "top" in params:
        x = pad_crop(x, spec.crop_padding, params["top"], params["left"])
    if "flip" in params:
        x = hflip(x, params["flip"])
    return x


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Crop then flip `x` (any dtype, any device) with parameters drawn from `generator`."""
    if not spec.enabled:
        return x
    return apply_params(x, spec, sample_params(spec, x.shape[0], generator))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 `(x/255 - mean)/std`; float input is taken as already in units: `(x-mean)/std`.

    `mean`/`std` broadcast against the batch (e.g. `[1, C, 1, 1]`).
    """
    if x.dtype == torch.uint8:
        return (x.float().div_(255.0)).sub_(mean).div_(std)
    return (x.float() - mean).div_(std)
