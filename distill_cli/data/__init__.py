"""The data layer: datasets as `DataBundle`s of train/val/test splits that yield `Batch`es.

Each `conf/dataset/<name>.yaml` is `_target_: <builder>` plus its options; `build_dataset(name,
**options)` does the same without Hydra. Builders return CPU data; call `bundle.to(device)`.
See `bundle.py` for the determinism contract and `fetch.py` for getting files onto disk.
"""
from __future__ import annotations

import importlib

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import (DATA_VERSION, Batch, DataBundle, InMemorySplit, LoaderSplit,
                                     Split, epoch_order)
from distill_cli.errors import UserError

#: dataset name -> builder ("module:function"), the same targets as conf/dataset/*.yaml
BUILDERS = {
    "fashion_mnist": "distill_cli.data.fashion_mnist:build",
    "mnist": "distill_cli.data.mnist:build",
    "cifar10": "distill_cli.data.cifar:build_cifar10",
    "cifar100": "distill_cli.data.cifar:build_cifar100",
    "svhn": "distill_cli.data.svhn:build",
    "imagefolder": "distill_cli.data.imagefolder:build",
    "digits": "distill_cli.data.digits:build",
    "mnist1d": "distill_cli.data.mnist1d:build",
    "fake": "distill_cli.data.fake:build",
    "distilled": "distill_cli.data.distilled:load",
    "text": "distill_cli.data.text:build",
    "toolcalc": "distill_cli.data.toolcalc:build",
}


def build_dataset(name: str, **options) -> DataBundle:
    """Build dataset `name` (a key of `BUILDERS`) with the given options, on the CPU."""

    if name not in BUILDERS:
        raise UserError(f"unknown dataset {name!r}", key="dataset",
                        fix=f"Choose one of {', '.join(BUILDERS)}")
    module, func = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), func)(**options)


__all__ = ["AugmentSpec", "Batch", "BUILDERS", "DATA_VERSION", "DataBundle", "InMemorySplit",
           "LoaderSplit", "Split", "build_dataset", "epoch_order"]
