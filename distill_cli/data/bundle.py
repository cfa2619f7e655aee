"""The data contract: `Batch`, the two split kinds and `DataBundle`.

Determinism. A training epoch is a pure function of `(seed, epoch)`, and each of its batches of
`(seed, epoch, step)`:

* order  = `torch.randperm(N, generator=torch.Generator().manual_seed(derive_seed("order", seed, epoch)))`
* batch `step` = `order[step*B:(step+1)*B]` (drop_last), augmented with parameters drawn from a CPU
  generator seeded with `derive_seed("augment", seed, epoch, step)`.

So `train_batches(..., start_step=k)` yields exactly batches k, k+1, ... of the uninterrupted epoch,
which is what resuming from a mid-epoch checkpoint needs. `Batch.index` holds positions in the
split (0..len-1): stable ids for stored teacher outputs.

Everything in a `Batch` (index, x, y) lives on the split's device.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Union, runtime_checkable

import torch

from distill_cli.data.augment import AugmentSpec, augment_batch, normalize
from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed

#: bump when a change here alters which samples/pixels a given config yields (cache keys use it).
DATA_VERSION = 1


class Batch(NamedTuple):
    index: torch.Tensor  # int64 [B], positions in the split
    x: torch.Tensor      # float32, normalised (and augmented for training), on the split's device
    y: torch.Tensor      # int64 [B], on the split's device


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The CPU permutation that orders training epoch `epoch` of a split of size `n`."""
    g = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(n, generator=g)


def augment_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("augment", seed, epoch, step))


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def _num_batches(n: int, batch_size: int, train: bool) -> int:
    _check_batch_size(batch_size)
    return n // batch_size if train else math.ceil(n / batch_size)


@runtime_checkable
class Split(Protocol):
    """What the engine relies on; `InMemorySplit` and `LoaderSplit` implement it."""

    def __len__(self) -> int: ...
    def num_batches(self, batch_size: int, train: bool) -> int: ...
    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0
                      ) -> Iterator[Batch]: ...
    def eval_batches(self, batch_size: int) -> Iterator[Batch]: ...
    def to(self, device) -> "Split": ...


class HeldSplit:
    """What every split held as tensors `x`, `y` (first dim N) on one device shares: its size and
    device, and a training epoch's order — `epoch_order(N, seed, epoch)` cut to whole batches, so
    batch `step` is a pure function of (seed, epoch, step). Subclasses yield the batches
    (`_train_iter`)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def targets(self) -> torch.Tensor:
        """All labels (targets), in split order, on the split's device."""
        return self.y

    def num_batches(self, batch_size: int, train: bool) -> int:
        return _num_batches(len(self), batch_size, train)

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0
                      ) -> Iterator[Batch]:
        steps = self.num_batches(batch_size, train=True)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        order = epoch_order(len(self), seed, epoch)[: steps * batch_size].to(self.device)
        return self._train_iter(order, batch_size, seed, epoch, start_step, steps)

    def _train_iter(self, order, batch_size, seed, epoch, start_step, steps) -> Iterator[Batch]:
        raise NotImplementedError


class InMemorySplit(HeldSplit):
    """A whole split held as one tensor on one device.

    x: uint8 `[N, C, H, W]` images (normalised per batch as `(x/255 - mean)/std`) or float32
       `[N, C, L]` signals (normalised as `(x - mean)/std`).
    y: int64 `[N]`.
    mean/std: per-channel sequences (length C).
    augment: applied by `train_batches` only (None/disabled = never).
    source_index: int64 `[N]`, where each sample sits in the source dataset (informational).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, mean: Sequence[float],
                 std: Sequence[float], augment: AugmentSpec | None = None,
                 source_index: torch.Tensor | None = None):
        if x.dim() not in (3, 4):
            raise ValueError(f"x must be [N,C,H,W] or [N,C,L], got {tuple(x.shape)}")
        if x.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"x must be uint8 or float32, got {x.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must be [N]={x.shape[0]}, got {tuple(y.shape)}")
        self.x = x
        self.y = y.to(device=x.device, dtype=torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1]:
            raise ValueError(f"mean/std need {x.shape[1]} channel values")
        self.augment = augment if augment is not None else AugmentSpec()
        self.source_index = (source_index if source_index is not None
                             else torch.arange(x.shape[0]))
        view = (1, -1) + (1,) * (x.dim() - 2)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(view)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(view)

    # --- contract (size, device, epoch order: HeldSplit) ------------------------------------
    def _train_iter(self, order, batch_size, seed, epoch, start_step, steps) -> Iterator[Batch]:
        for step in range(start_step, steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = self.x.index_select(0, idx)
            if self.augment.enabled:
                x = augment_batch(x, self.augment, augment_generator(seed, epoch, step))
            yield Batch(idx, normalize(x, self._mean, self._std), self.y.index_select(0, idx))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_batch_size(batch_size)
        return self._eval_iter(batch_size)

    def _eval_iter(self, batch_size: int) -> Iterator[Batch]:
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            idx = torch.arange(start, stop, device=self.device)
            yield Batch(idx, normalize(self.x[start:stop], self._mean, self._std),
                        self.y[start:stop])

    def to(self, device) -> "InMemorySplit":
        device = torch.device(device)
        if device == self.device:
            return self
        return InMemorySplit(self.x.to(device), self.y.to(device), mean=self.mean, std=self.std,
                             augment=self.augment, source_index=self.source_index)

    def __repr__(self) -> str:
        return (f"InMemorySplit(n={len(self)}, shape={tuple(self.x.shape[1:])}, "
                f"dtype={self.x.dtype}, device={self.device}, augment={self.augment})")


class LoaderSplit:
    """The same interface over a `torch.utils.data.DataLoader`, for data too large to hold.

    dataset: a map-style dataset whose `__getitem__` takes `(position, sample_seed_or_None)` and
        returns `(position, x_float_tensor, label)`; `sample_seed` is None for evaluation (no
        augmentation) and otherwise a seed the item must use for its random transform (so batch
        contents are a pure function of (seed, epoch, step) whatever the worker count).
    targets: int64 `[N]` labels in split order.
    """

    def __init__(self, dataset, targets: torch.Tensor, *, num_workers: int = 0,
                 device: torch.device | str = "cpu", augment: bool = True,
                 prefetch_factor: int | None = None):
        self.dataset = dataset
        self._targets = targets.to(torch.int64).cpu()
        self.num_workers = int(num_workers)
        self.augment = bool(augment)
        self.prefetch_factor = prefetch_factor
        self._device = torch.device(device)

    def __len__(self) -> int:
        return int(self._targets.shape[0])

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def targets(self) -> torch.Tensor:
        return self._targets.to(self._device)

    def num_batches(self, batch_size: int, train: bool) -> int:
        return _num_batches(len(self), batch_size, train)

    def _loader(self, batches: list[list[tuple[int, int | None]]]):
        from torch.utils.data import DataLoader

        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self._device.type == "cuda", **kwargs)

    def _move(self, loader) -> Iterator[Batch]:
        nb = self._device.type == "cuda"
        for index, x, y in loader:
            yield Batch(index.to(self._device, torch.int64, non_blocking=nb),
                        x.to(self._device, torch.float32, non_blocking=nb),
                        y.to(self._device, torch.int64, non_blocking=nb))

    def train_batches(self, batch_size: int, seed: int, epoch: int, start_step: int = 0
                      ) -> Iterator[Batch]:
        steps = self.num_batches(batch_size, train=True)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        order = epoch_order(len(self), seed, epoch).tolist()
        batches = []
        for step in range(start_step, steps):
            pos = order[step * batch_size:(step + 1) * batch_size]
            if self.augment:
                batches.append([(p, derive_seed("augment", seed, epoch, step, j))
                                for j, p in enumerate(pos)])
            else:
                batches.append([(p, None) for p in pos])
        return self._move(self._loader(batches))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_batch_size(batch_size)
        n = len(self)
        batches = [[(p, None) for p in range(s, min(s + batch_size, n))]
                   for s in range(0, n, batch_size)]
        return self._move(self._loader(batches))

    def to(self, device) -> "LoaderSplit":
        out = copy.copy(self)
        out._device = torch.device(device)
        return out

    def __repr__(self) -> str:
        return (f"LoaderSplit(n={len(self)}, num_workers={self.num_workers}, "
                f"device={self._device}, augment={self.augment})")


SplitT = Union[InMemorySplit, LoaderSplit]


@dataclass
class DataBundle:
    name: str
    train: SplitT
    val: SplitT
    test: SplitT
    num_classes: int
    input_shape: tuple[int, ...]
    identity: dict  # JSON-able; everything that determines the data, never the root path
    class_names: tuple[str, ...] | None = field(default=None)
    # the data a teacher of this data learns from when the teacher store trains one; None = this
    # bundle. dataset=distilled (data/distilled.py): the SOURCE dataset, never the synthetic set
    teacher_data: "DataBundle | None" = field(default=None)

    def to(self, device) -> "DataBundle":
        moved = {id(s): s.to(device) for s in (self.train, self.val, self.test)}
        teacher = None
        if self.teacher_data is not None:   # splits it shares with this bundle are moved once
            t = self.teacher_data
            splits = {name: getattr(t, name) for name in ("train", "val", "test")}
            teacher = dataclasses.replace(t, **{
                name: moved[id(s)] if id(s) in moved else s.to(device)
                for name, s in splits.items()})
        return dataclasses.replace(self, train=moved[id(self.train)], val=moved[id(self.val)],
                                   test=moved[id(self.test)], teacher_data=teacher)

    @property
    def device(self) -> torch.device:
        return self.train.device


# --- helpers shared by the builders ----------------------------------------------------------

def check_common(val_fraction, split_seed, limit_train, limit_eval) -> None:
    """Validate the options every dataset takes; raise `UserError` naming the key."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}",
                        key="dataset.val_fraction", fix="Use e.g. 0.1 (0 = no validation split)")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise UserError(f"split_seed must be an integer, got {split_seed!r}", key="dataset.split_seed")
    for key, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{key} must be a positive integer or null, got {value!r}",
                            key=f"dataset.{key}", fix="Use null for the full split")


def split_positions(n_train: int, n_test: int, *, val_fraction: float, split_seed: int,
                    limit_train: int | None, limit_eval: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (sorted ascending) of the train, val and test splits.

    val = the first `round(n_train * val_fraction)` of `randperm(n_train)` seeded by `split_seed`;
    train = the rest. Limits keep the first N of that shuffled order (test: of its own
    `split_seed` permutation), so a limited split is a fixed random subset, not the first N files.
    Each split is then sorted by source index.
    """
    check_common(val_fraction, split_seed, limit_train, limit_eval)
    n_val = int(round(n_train * float(val_fraction)))
    if n_val >= n_train:
        raise UserError(f"val_fraction={val_fraction} leaves no training samples out of {n_train}",
                        key="dataset.val_fraction")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val, train = perm[:n_val], perm[n_val:]
    test = torch.randperm(n_test, generator=torch.Generator().manual_seed(split_seed))
    if limit_train is not None:
        train = train[:limit_train]
    if limit_eval is not None:
        val, test = val[:limit_eval], test[:limit_eval]
    return train.sort().values, val.sort().values, test.sort().values


def common_identity(name: str, *, val_fraction, split_seed, limit_train, limit_eval,
                    augment: AugmentSpec, **extra) -> dict:
    ident = {"name": name, "data_version": DATA_VERSION, "val_fraction": float(val_fraction),
             "split_seed": int(split_seed), "limit_train": limit_train, "limit_eval": limit_eval,
             "augment": augment.as_dict()}
    ident.update(extra)
    return ident


def make_in_memory_bundle(name: str, *, train_x: torch.Tensor, train_y: torch.Tensor,
                          test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                          mean: Sequence[float] | Callable[[torch.Tensor], Sequence[float]],
                          std: Sequence[float] | Callable[[torch.Tensor], Sequence[float]] | None = None,
                          val_fraction: float, split_seed: int, limit_train: int | None,
                          limit_eval: int | None, augment: AugmentSpec,
                          class_names: Sequence[str] | None = None, **identity_extra) -> DataBundle:
    """Carve val from train, apply limits, wrap everything in `InMemorySplit`s (CPU).

    `mean` may be a callable taking the (pre-limit) training tensor and returning `(mean, std)`,
    for datasets normalised with statistics of their own training split.
    """
    tr, va, te = split_positions(len(train_y), len(test_y), val_fraction=val_fraction,
                                 split_seed=split_seed, limit_train=limit_train,
                                 limit_eval=limit_eval)
    if callable(mean):  # statistics of the whole training split (after carving val, before limits)
        full_train = split_positions(len(train_y), 1, val_fraction=val_fraction,
                                     split_seed=split_seed, limit_train=None, limit_eval=None)[0]
        mean, std = mean(train_x.index_select(0, full_train))
    assert std is not None
    train_y = torch.as_tensor(train_y, dtype=torch.int64)
    test_y = torch.as_tensor(test_y, dtype=torch.int64)

    def split(x, y, pos, aug):
        return InMemorySplit(x.index_select(0, pos).contiguous(), y.index_select(0, pos),
                             mean=mean, std=std, augment=aug, source_index=pos)

    train = split(train_x, train_y, tr, augment)
    val = split(train_x, train_y, va, None)
    test = split(test_x, test_y, te, None)
    input_shape = tuple(int(s) for s in train_x.shape[1:])
    identity = common_identity(
        name, val_fraction=val_fraction, split_seed=split_seed, limit_train=limit_train,
        limit_eval=limit_eval, augment=augment, num_classes=int(num_classes),
        input_shape=list(input_shape),
        sizes={"train": len(train), "val": len(val), "test": len(test)},
        normalization={"mean": [round(float(m), 8) for m in mean],
                       "std": [round(float(s), 8) for s in std]},
        **identity_extra)
    return DataBundle(name=name, train=train, val=val, test=test, num_classes=int(num_classes),
                      input_shape=input_shape, identity=identity,
                      class_names=tuple(class_names) if class_names is not None else None)
