"""Everything a run checks before anything expensive happens: the values a user types, the
objective and every option that can be refused, and the device."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli.config.build import build_objective, build_task, model_node, objective_class
from distill_cli.data import unlabeled
from distill_cli.data.mixing import MIX_OFF, MixSpec
from distill_cli.errors import UserError
from distill_cli.evaluation.adversarial import pgd_settings
from distill_cli.losses.base import CriticObjective, Objective
from distill_cli.tasks.base import Task
from distill_cli.training.distributed import SINGLE, World
from distill_cli.training.settings import check_numbers
from distill_cli.teachers.resolve import check_teachers


def nonfinite_numbers(node, prefix: str = "") -> list[tuple[str, float]]:
    """(key, value) of every nan/inf float under `node` (a plain container), keys as a user
    types them (`teachers[1].seed`)."""
    if isinstance(node, dict):
        items = [(f"{prefix}{k}", v) for k, v in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(f"{prefix[:-1]}[{i}]", v) for i, v in enumerate(node)]
    elif isinstance(node, float) and not math.isfinite(node):
        return [(prefix[:-1], node)]
    else:
        return []
    return [bad for key, value in items for bad in nonfinite_numbers(value, key + ".")]


def check_finite(cfg: DictConfig) -> None:
    """No nan/inf anywhere in the composed config: a learning rate, loss weight, temperature
    or trainer number that is not finite trains NaN weights and still "finishes". A generic
    walk rather than a list of keys, so a new option is covered the day it is added."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:   # an interpolation that does not resolve: reported where it is used
        plain = OmegaConf.to_container(cfg, resolve=False)
    bad = nonfinite_numbers(plain)
    if bad:
        key, value = bad[0]
        others = f" (also: {', '.join(k for k, _ in bad[1:])})" if len(bad) > 1 else ""
        raise UserError(f"`{key}` is {value}: every number in a run's config must be finite"
                        + others, key, f"Pass a finite value for {key}")


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values a user types, before anything expensive happens."""
    check_finite(cfg)
    check_numbers(cfg)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise UserError(f"`optimizer.lr` must be a positive number, got {lr!r}", "optimizer.lr",
                        "Pass e.g. optimizer.lr=0.05")
    if str(cfg.trainer.precision) not in ("32", "bf16", "fp16"):
        raise UserError(f"trainer.precision={cfg.trainer.precision} is not supported",
                        "trainer.precision", "Use 32, bf16 or fp16 (with loss scaling)")
    if cfg.trainer.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"trainer.device={cfg.trainer.device} is not supported",
                        "trainer.device", "Use auto, cpu or cuda")
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available", "trainer.device",
                        "Use trainer.device=auto or cpu")
    if model_node(cfg.student) is None:
        raise UserError("student=none: a run needs a student to train", "student",
                        "Pick an architecture, e.g. student=resnet8")


def mia_settings(cfg: DictConfig, objective) -> dict | None:
    """`membership_auc` keyword arguments when `eval.mia` asks for it (auto: the objective's
    `measures_privacy`), else None."""
    mode = OmegaConf.select(cfg, "eval.mia", default="auto")
    if mode not in ("auto", True, False):
        raise UserError(f"eval.mia={mode} is not an option", "eval.mia", "Use auto, true or false")
    if not (objective.measures_privacy if mode == "auto" else mode):
        return None
    limit = OmegaConf.select(cfg, "eval.mia_max_samples", default=None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"eval.mia_max_samples={limit} must be a positive integer or null",
                        "eval.mia_max_samples", "Use e.g. 10000")
    return {"batch_size": int(cfg.trainer.eval_batch_size), "max_samples": limit,
            "seed": int(cfg.seed)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Plan:
    """What a run will do, checked: the task, the objective, batch mixing, membership inference
    and PGD settings (None = off), and whether the student trains without labels."""

    task: Task
    objective: Objective
    mix: MixSpec
    mia: dict | None
    label_free: bool
    pgd: dict | None


def check_data_parallel(cfg: DictConfig, objective: Objective, world: World) -> None:
    """What torchrun cannot run as the 1-process run would, refused before any work."""
    if not world.distributed:
        return
    batch = int(cfg.trainer.batch_size)
    if batch % world.size:
        raise UserError(f"trainer.batch_size={batch} is the GLOBAL batch and must split evenly "
                        f"over the {world.size} processes", "trainer.batch_size",
                        f"Use a multiple of {world.size}, e.g. "
                        f"trainer.batch_size={batch - batch % world.size or world.size}")
    if objective.batch_coupling:
        raise UserError(f"loss={type(objective).__name__} cannot train data-parallel: "
                        f"{objective.batch_coupling}, so {world.size} processes holding a slice "
                        "each would compute another loss than one process", "loss",
                        "Run it in one process (plain `distill`), or pick a loss whose value is "
                        "a mean over samples (kd, dkd, ...)")
    if cfg.trainer.get("sync_batchnorm") and cfg.trainer.device != "cuda":
        raise UserError("trainer.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU kernel)",
                        "trainer.sync_batchnorm", "Drop it on CPU: each process then normalises "
                        "with its own slice's statistics")


def checked_plan(cfg: DictConfig, world: World = SINGLE) -> Plan:
    """The objective and every run option that can be refused, checked before anything
    expensive (`world`: the data-parallel ranks the run will train on)."""
    task = build_task(cfg.task)
    task.check_objective(objective_class(cfg.loss))
    objective = build_objective(cfg.loss)
    check_data_parallel(cfg, objective, world)
    if isinstance(objective, CriticObjective) and str(cfg.trainer.precision) == "fp16":
        raise UserError(f"loss={type(objective).__name__} trains a critic next to the student, "
                        "and fp16's loss scaling is not supported for two networks' updates "
                        "(DMD2's authors: fp16 diverges)", "trainer.precision",
                        "Use trainer.precision=bf16 (the authors' choice) or 32")
    mix = MixSpec.from_config(cfg.augment.mix)
    if mix.enabled and not objective.accepts_soft_targets:
        raise UserError(f"loss={type(objective).__name__} indexes by the hard label, so it "
                        "cannot train on mixup/CutMix batches (their targets are label "
                        "mixtures)", "augment.mix",
                        f"Turn mixing off ({MIX_OFF}) or pick another loss")
    check_teachers(cfg.teacher, list(OmegaConf.select(cfg, "teachers", default=[]) or []),
                   objective)
    mia = mia_settings(cfg, objective)
    label_free = unlabeled.check(cfg.dataset, objective, mix.enabled, mia is not None)
    # eval.pgd: validated now, run after training
    pgd = pgd_settings(OmegaConf.select(cfg, "eval.pgd"), seed=int(cfg.seed),
                       batch_size=int(cfg.trainer.eval_batch_size),
                       precision=str(cfg.trainer.precision))
    return Plan(task, objective, mix, mia, label_free, pgd)
