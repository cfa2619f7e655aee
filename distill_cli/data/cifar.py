"""CIFAR-10 and CIFAR-100: 50k train / 10k test, 3x32x32 (torchvision, under `root`).

Default augmentation: the standard random crop (padding 4) + horizontal flip.
Normalisation: the datasets' per-channel training-set mean and (true) standard deviation.
"""
from __future__ import annotations

import numpy as np
import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.data.sources import DEFAULT_TIMEOUT, load_torchvision
from distill_cli.errors import UserError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DEFAULT_AUGMENT = AugmentSpec(crop_padding=4, hflip=True)


def _ensure(cls, name, root, download, timeout):
    kw = dict(download=download, timeout=timeout, urls=[cls.url])
    return (load_torchvision(cls, name, root, train=True, **kw),
            load_torchvision(cls, name, root, train=False, **kw))


def ensure_cifar10(root=None, download: bool = True, timeout: float = DEFAULT_TIMEOUT):
    from torchvision.datasets import CIFAR10

    return _ensure(CIFAR10, "cifar10", root, download, timeout)


def ensure_cifar100(root=None, download: bool = True, timeout: float = DEFAULT_TIMEOUT):
    from torchvision.datasets import CIFAR100

    return _ensure(CIFAR100, "cifar100", root, download, timeout)


def _images(ds) -> torch.Tensor:  # torchvision keeps CIFAR as uint8 [N, 32, 32, 3]
    return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))


def _build(name, ensure, num_classes, mean, std, root, download, val_fraction, split_seed,
           limit_train, limit_eval, augment, download_timeout) -> DataBundle:
    aug = AugmentSpec.from_config(augment, default=DEFAULT_AUGMENT)
    train, test = ensure(root, bool(download), download_timeout)
    return make_in_memory_bundle(
        name, train_x=_images(train), train_y=torch.as_tensor(train.targets, dtype=torch.int64),
        test_x=_images(test), test_y=torch.as_tensor(test.targets, dtype=torch.int64),
        num_classes=num_classes, mean=mean, std=std, val_fraction=val_fraction,
        split_seed=split_seed, limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=list(train.classes))


def build_cifar10(root=None, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
                  limit_train: int | None = None, limit_eval: int | None = None, augment=None,
                  download_timeout: float = DEFAULT_TIMEOUT) -> DataBundle:
    return _build("cifar10", ensure_cifar10, 10, CIFAR10_MEAN, CIFAR10_STD, root, download,
                  val_fraction, split_seed, limit_train, limit_eval, augment, download_timeout)


def build_cifar100(root=None, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
                   limit_train: int | None = None, limit_eval: int | None = None, augment=None,
                   download_timeout: float = DEFAULT_TIMEOUT) -> DataBundle:
    return _build("cifar100", ensure_cifar100, 100, CIFAR100_MEAN, CIFAR100_STD, root, download,
                  val_fraction, split_seed, limit_train, limit_eval, augment, download_timeout)


def build(variant: str = "cifar10", **options) -> DataBundle:
    """`build_cifar10` or `build_cifar100` by name (the YAMLs target those directly)."""
    builders = {"cifar10": build_cifar10, "cifar100": build_cifar100}
    if variant not in builders:
        raise UserError(f"unknown CIFAR variant {variant!r}", key="dataset.variant",
                        fix="Use cifar10 or cifar100")
    return builders[variant](**options)
