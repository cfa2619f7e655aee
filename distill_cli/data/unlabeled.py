"""Label-free training data for label-free objectives (SSLD, TAID without CE).

Two dataset options, applied to the STUDENT's training split after the teacher is resolved (a
teacher the store trains is trained on the labelled split, as a teacher is):

* `dataset.labels: false` — the training labels are replaced by `UNLABELED` (-1) before training
  starts, so they cannot be read; an objective that reads labels is refused. Validation and test
  labels stay: they select `best` and report accuracy, exactly as in a labelled run.
* `dataset.extra_unlabeled: <a dataset node>` — the TRAINING split of another dataset config (same
  input shape; normalised with the main dataset's statistics, augmented like the main split) is
  appended with label `UNLABELED`. Compose one from the dataset group:
  `+dataset@dataset.extra_unlabeled=mnist`, then set its options as
  `dataset.extra_unlabeled.limit_train=...`.

Hiding labels does not change which images a batch holds, so stored teacher outputs are shared
with labelled runs; extra data does (it is part of the data identity).
"""
from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli.data.bundle import DataBundle, InMemorySplit
from distill_cli.data.mixing import MIX_OFF
from distill_cli.errors import UserError

UNLABELED = -1
#: dataset keys the runner reads itself; the dataset builders never see them
RUN_KEYS = ("labels", "extra_unlabeled")


def options(node: DictConfig) -> tuple[bool, DictConfig | None]:
    labels = OmegaConf.select(node, "labels", default=True)
    if not isinstance(labels, bool):
        raise UserError(f"dataset.labels={labels!r} must be true or false", "dataset.labels",
                        "Use dataset.labels=false to train without the training labels")
    return labels, OmegaConf.select(node, "extra_unlabeled", default=None)


def check(node: DictConfig, objective, mixing: bool, mia: bool) -> bool:
    """Whether the run trains label-free; raises for combinations that would read labels."""
    labels, extra = options(node)
    if labels and extra is None:
        return False
    key = "dataset.labels" if not labels else "dataset.extra_unlabeled"
    what = "without training labels" if not labels else "on unlabeled extra data"
    undo = "set dataset.labels=true" if not labels else "drop dataset.extra_unlabeled"
    name = type(objective).__name__
    if objective.uses_labels:
        raise UserError(f"loss={name} reads the training labels, so it cannot train {what}", key,
                        "Use a label-free loss (loss=ssld, or loss=taid with ce_weight=0), or "
                        f"{undo}")
    if mixing:
        raise UserError(f"mixup/CutMix targets are label mixtures, so they cannot be used {what}",
                        "augment.mix", f"Turn mixing off ({MIX_OFF}) or {undo}")
    if mia:
        raise UserError(f"membership inference (eval.mia) scores training samples by their loss "
                        f"on the true labels, which a run {what} does not have", "eval.mia",
                        f"Pass eval.mia=false, or {undo}")
    return True


def student_view(node: DictConfig, data: DataBundle, build_extra) -> DataBundle:
    """`data` with the training split as the student trains on it (see the module docstring);
    `build_extra(node)` builds the extra dataset's bundle."""
    labels, extra_node = options(node)
    train = data.train
    if not isinstance(train, InMemorySplit):
        raise UserError("dataset.labels=false / dataset.extra_unlabeled need an in-memory "
                        f"dataset, but {data.name} streams from disk", "dataset.labels",
                        "Drop the option, or use an in-memory dataset")
    x, y, source = train.x, train.y, train.source_index
    if not labels:
        y = torch.full_like(y, UNLABELED)
    identity = dict(data.identity)
    if extra_node is not None:
        extra = build_extra(extra_node).to(train.device)
        if tuple(extra.input_shape) != tuple(data.input_shape) or extra.train.x.dtype != x.dtype:
            raise UserError(f"dataset.extra_unlabeled ({extra.name}, inputs "
                            f"{tuple(extra.input_shape)}) does not match {data.name}'s inputs "
                            f"{tuple(data.input_shape)}", "dataset.extra_unlabeled",
                            "Use extra data of the same shape (e.g. 1x28x28 for Fashion-MNIST)")
        ex = extra.train.x
        x = torch.cat([x, ex])
        y = torch.cat([y, torch.full((len(ex),), UNLABELED, dtype=y.dtype, device=y.device)])
        source = torch.cat([source, extra.train.source_index])
        identity["extra_unlabeled"] = extra.identity
    split = InMemorySplit(x, y, mean=train.mean, std=train.std, augment=train.augment,
                          source_index=source)
    return dataclasses.replace(data, train=split, identity=identity)
