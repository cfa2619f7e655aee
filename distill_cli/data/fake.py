"""Synthetic, learnable data for tests and smoke runs: no files, no download.

Each class has a smooth random prototype (a 4x4 (or length-8) random grid, bilinearly upsampled
to `shape`); a sample is `255 * (0.6 * prototype + 0.4 * uniform_noise)` as uint8, so classes are
separable by a linear model and by small CNNs, while single pixels stay noisy. Labels are balanced.
Prototypes, train and test data come from generators derived from `seed`, so the test set does
not change with `train_size`. Normalisation: mean 0.5, std 0.17 per channel (about unit
variance). No augmentation by default. `root` and `download` are accepted for uniformity and ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.seeding import derive_seed
from distill_cli.errors import UserError


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("fake", *parts))


def prototypes(num_classes: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float [K, *shape] in [0, 1]."""
    c, *spatial = shape
    coarse = [4] * len(spatial) if len(spatial) == 2 else [8]
    low = torch.rand(num_classes, c, *coarse, generator=_gen(seed, "prototypes"))
    mode = "bilinear" if len(spatial) == 2 else "linear"
    return F.interpolate(low, size=tuple(spatial), mode=mode, align_corners=True)


def _samples(protos: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = protos.shape[0]
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    noise = torch.rand((n,) + tuple(protos.shape[1:]), generator=g)
    x = (0.6 * protos[y] + 0.4 * noise).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return x, y


def build(root=None, download: bool = False, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          num_classes: int = 10, shape=(3, 32, 32), train_size: int = 1000, test_size: int = 200,
          seed: int = 0) -> DataBundle:
    aug = AugmentSpec.from_config(augment)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise UserError(f"shape must be [C, H, W] or [C, L] with positive sizes, got {list(shape)}",
                        key="dataset.shape")
    for key, value, lo in (("num_classes", num_classes, 2), ("train_size", train_size, 2),
                           ("test_size", test_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise UserError(f"{key} must be an integer >= {lo}, got {value!r}", key=f"dataset.{key}")
    protos = prototypes(num_classes, shape, seed)
    train_x, train_y = _samples(protos, train_size, _gen(seed, "train"))
    test_x, test_y = _samples(protos, test_size, _gen(seed, "test"))
    c = shape[0]
    return make_in_memory_bundle(
        "fake", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=num_classes, mean=(0.5,) * c, std=(0.17,) * c, val_fraction=val_fraction,
        split_seed=split_seed, limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=[f"class_{i}" for i in range(num_classes)],
        generator={"num_classes": num_classes, "shape": list(shape), "train_size": train_size,
                   "test_size": test_size, "seed": int(seed)})
