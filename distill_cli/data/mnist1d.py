"""MNIST-1D (Greydanus 2020): 1-D signals of length 40, 10 classes; generated locally, no download.

Made with the `mnist1d` package's own generator (`mnist1d.data.make_dataset`) and its default
arguments (`get_dataset_args()`: 5000 samples, 80/20 split -> 4000 train / 1000 test, length 40,
seed 42); `generator_seed` overrides that seed. The package's download helpers are never called.
Stored as float32 [N, 1, 40]; normalised per batch with the mean/std of the training split
(after carving val, before limits). No augmentation by default.
`root` and `download` are accepted for uniformity and ignored.
"""
from __future__ import annotations

import functools
import random

import numpy as np
import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle


@functools.lru_cache(maxsize=2)
def generate(generator_seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from the package generator; global RNGs are restored."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(generator_seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds numpy's and Python's global RNGs
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    out = (ds["x"], ds["y"], ds["x_test"], ds["y_test"])
    out = tuple(np.ascontiguousarray(a) for a in out)
    for a in out:
        a.setflags(write=False)
    return out


def _train_stats(x: torch.Tensor):
    return (x.mean().item(),), (x.std().item(),)


def build(root=None, download: bool = False, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          generator_seed: int = 42) -> DataBundle:
    aug = AugmentSpec.from_config(augment)
    x_tr, y_tr, x_te, y_te = generate(int(generator_seed))
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return make_in_memory_bundle(
        "mnist1d", train_x=as_x(x_tr), train_y=torch.tensor(y_tr, dtype=torch.int64),
        test_x=as_x(x_te), test_y=torch.tensor(y_te, dtype=torch.int64), num_classes=10,
        mean=_train_stats, val_fraction=val_fraction, split_seed=split_seed,
        limit_train=limit_train, limit_eval=limit_eval, augment=aug,
        class_names=[str(i) for i in range(10)], generator_seed=int(generator_seed))
