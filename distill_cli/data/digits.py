"""scikit-learn's 8x8 handwritten digits: 1797 images, 1x8x8, 10 classes; no download.

Pixel values 0..16 are scaled to uint8 0..255 (round(v*255/16)). The test set is a stratified 20%
split chosen by `test_seed` (fixed by default, independent of `split_seed`, so changing the
validation carve never changes the test set): 1437 train(+val) / 360 test. Normalisation constants
are the mean/std of all 1797 images after scaling. No augmentation by default.
`root` and `download` are accepted for uniformity and ignored.
"""
from __future__ import annotations

import numpy as np
import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.errors import UserError

MEAN, STD = (0.3053,), (0.3759,)


def build(root=None, download: bool = False, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          test_fraction: float = 0.2, test_seed: int = 0) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    aug = AugmentSpec.from_config(augment)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction!r}",
                        key="dataset.test_fraction")
    d = load_digits()
    x = np.rint(d.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=float(test_fraction),
                              random_state=int(test_seed), stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    return make_in_memory_bundle(
        "digits", train_x=torch.from_numpy(x[tr]), train_y=torch.from_numpy(y[tr]),
        test_x=torch.from_numpy(x[te]), test_y=torch.from_numpy(y[te]), num_classes=10,
        mean=MEAN, std=STD, val_fraction=val_fraction, split_seed=split_seed,
        limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=[str(i) for i in range(10)],
        test_fraction=float(test_fraction), test_seed=int(test_seed))
