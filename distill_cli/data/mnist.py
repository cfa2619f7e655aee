"""MNIST: 60k train / 10k test, 1x28x28 grayscale digits, 10 classes (torchvision, under `root/MNIST`).

Default augmentation: none (allow with `augment: {crop_padding: 2}`; flips change digit identity).
"""
from __future__ import annotations

import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.data.sources import DEFAULT_TIMEOUT, load_torchvision

MEAN, STD = (0.1307,), (0.3081,)
DEFAULT_AUGMENT = AugmentSpec(crop_padding=0, hflip=False)


def ensure(root=None, download: bool = True, timeout: float = DEFAULT_TIMEOUT):
    """(train, test) torchvision datasets; `UserError` when absent and not downloadable."""
    from torchvision.datasets import MNIST

    kw = dict(download=download, timeout=timeout, urls=[m for m in MNIST.mirrors])
    train = load_torchvision(MNIST, "mnist", root, train=True, **kw)
    test = load_torchvision(MNIST, "mnist", root, train=False, **kw)
    return train, test


def build(root=None, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          download_timeout: float = DEFAULT_TIMEOUT) -> DataBundle:
    aug = AugmentSpec.from_config(augment, default=DEFAULT_AUGMENT)
    train, test = ensure(root, bool(download), download_timeout)
    return make_in_memory_bundle(
        "mnist", train_x=train.data.to(torch.uint8).unsqueeze(1).contiguous(),
        train_y=train.targets.to(torch.int64),
        test_x=test.data.to(torch.uint8).unsqueeze(1).contiguous(),
        test_y=test.targets.to(torch.int64),
        num_classes=10, mean=MEAN, std=STD, val_fraction=val_fraction, split_seed=split_seed,
        limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=[str(i) for i in range(10)])
