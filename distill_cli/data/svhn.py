"""SVHN (cropped digits): 73,257 train / 26,032 test, 3x32x32 (torchvision, under `root`).

The `extra` split is not used. Labels are 0..9 (torchvision maps the file's "10" to 0).
Default augmentation: random crop (padding 4) + horizontal flip, as asked for natural images;
many SVHN papers train without the flip (`augment: {hflip: false}`).
"""
from __future__ import annotations

import numpy as np
import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.data.sources import DEFAULT_TIMEOUT, load_torchvision

MEAN, STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
DEFAULT_AUGMENT = AugmentSpec(crop_padding=4, hflip=True)


def ensure(root=None, download: bool = True, timeout: float = DEFAULT_TIMEOUT):
    from torchvision.datasets import SVHN

    out = []
    for split in ("train", "test"):
        out.append(load_torchvision(SVHN, "svhn", root, split=split, download=download,
                                    timeout=timeout, urls=[SVHN.split_list[split][0]]))
    return tuple(out)


def build(root=None, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          download_timeout: float = DEFAULT_TIMEOUT) -> DataBundle:
    aug = AugmentSpec.from_config(augment, default=DEFAULT_AUGMENT)
    train, test = ensure(root, bool(download), download_timeout)
    return make_in_memory_bundle(
        "svhn", train_x=torch.from_numpy(np.ascontiguousarray(train.data, dtype=np.uint8)),
        train_y=torch.as_tensor(train.labels, dtype=torch.int64),
        test_x=torch.from_numpy(np.ascontiguousarray(test.data, dtype=np.uint8)),
        test_y=torch.as_tensor(test.labels, dtype=torch.int64),
        num_classes=10, mean=MEAN, std=STD, val_fraction=val_fraction, split_seed=split_seed,
        limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=[str(i) for i in range(10)])
