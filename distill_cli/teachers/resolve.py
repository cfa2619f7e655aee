"""Resolve the teacher: none, a checkpoint, published weights, or the teacher store (trained
once, then reused) — or, for online objectives (BD-KD), a fresh teacher that trains with the
student.

Whatever the source, the architecture and class count are checked against the dataset before
the student's training starts, and a non-online teacher comes back frozen: eval mode, no
gradients, never in the optimizer, BatchNorm folded into its convolutions.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from distill_cli import keys
from distill_cli.config.build import build_model, model_node
from distill_cli.errors import UserError
from distill_cli.losses.base import OnlineObjective, PoolObjective
from distill_cli.models.fold import fold_batchnorm
from distill_cli.runs import checkpoint
from distill_cli.seeding import derive_seed
from distill_cli.teachers.build import StoreAccess, from_store
from distill_cli.teachers.load import frozen_from_checkpoint, pretrained


def check_teachers(node: DictConfig, pool: list, objective) -> None:
    """The teacher setup the objective needs: one teacher (`node`, the `teacher` node), a pool
    (the `teachers` entries), or none."""
    name = type(objective).__name__
    if isinstance(objective, PoolObjective):
        if model_node(node) is not None:
            raise UserError(f"loss={name} distils from the `teachers` pool, but teacher="
                            f"{node.arch} was also given", "teacher",
                            "Use teacher=none and list the teachers in `teachers`")
        if not pool:
            raise UserError(f"loss={name} needs a pool of teachers but `teachers` is empty",
                            "teachers", "Pass e.g. 'teachers=[{arch: resnet8, checkpoint: "
                            "<run>/checkpoints/best.pt}, {arch: resnet8, seed: 1}]'")
        return
    if pool:
        raise UserError(f"`teachers` is set but loss={name} distils from one teacher", "teachers",
                        "Use loss=multi_teacher, or drop `teachers` and set `teacher`")
    if objective.needs_teacher and model_node(node) is None:
        if isinstance(objective, OnlineObjective):
            raise UserError(f"loss={name} trains a teacher alongside the student but teacher=none",
                            "teacher", "Name the teacher's architecture, e.g. teacher=resnet20 "
                            "(it starts from scratch; no checkpoint)")
        raise UserError(f"loss={name} distils from a teacher but "
                        "teacher=none", "teacher",
                        "Name a teacher and its weights (teacher=resnet20 "
                        "teacher.checkpoint=<run>/checkpoints/best.pt), or use loss=ce")


def online_teacher(node: DictConfig, data, device, method: str = "this loss"
                   ) -> tuple[nn.Module, dict]:
    """A freshly initialised teacher that trains with the student (BD-KD): no store, no
    checkpoint. Its init seed is derived from `teacher.seed` (not equal to it), so a teacher and
    student of the same architecture never start as the same network."""
    if node.get("checkpoint") or model_node(node).get("weights"):
        raise UserError(f"loss={method} trains its teacher from "
                        "scratch with the student, so it takes no teacher weights",
                        "teacher.checkpoint" if node.get("checkpoint") else "teacher.weights",
                        "Drop teacher.checkpoint / teacher.weights (teacher.seed sets the "
                        "online teacher's initialisation)")
    torch.manual_seed(derive_seed("online-teacher", int(node.seed)))
    model = build_model(node, "teacher", data).to(device).train()
    return model, {keys.TEACHER_SOURCE: "online", keys.TEACHER_SEED: int(node.seed)}


def resolve_teacher(node: DictConfig, data, device: torch.device, reporter,
                    access: StoreAccess, *, online: str | None = None, any_classes: bool = False,
                    fold: bool = True, role: str = "teacher") -> tuple[nn.Module | None, dict]:
    """Return (the teacher `node` describes or None, summary fields describing where it came
    from). The teacher is frozen, except with `online` (the method's name: a fresh, trainable
    one); `any_classes` accepts a checkpoint trained for another class count (a source teacher
    of the multi-teacher pool). `access` lets the store train a teacher it does not hold.
    `fold=False` keeps its BatchNorm layers (an objective that reads their statistics: SRe2L).
    `role` names the model in the store's messages."""
    arch = model_node(node)
    if arch is None:
        if node.get("checkpoint"):
            raise UserError("`teacher.checkpoint` is set but teacher=none", "teacher",
                            "Also name the teacher architecture, e.g. teacher=resnet20")
        return None, {}
    if online:
        return online_teacher(node, data, device, online)
    if not node.get("checkpoint") and arch.get("weights"):
        model = pretrained(arch, data, device)
        info = {keys.TEACHER_SOURCE: f"weights:{arch.weights}"}
        if getattr(model, "fingerprint", None):   # hf: the files' SHA-256 keys stored outputs
            info[keys.TEACHER_SOURCE] += f" sha256:{model.fingerprint}"
    elif not node.get("checkpoint"):
        model, info = from_store(node, data, device, reporter, access, role)
    else:
        ckpt = checkpoint.load(node.checkpoint, "teacher.checkpoint", fix=(
            "Use a checkpoint written by `distill` (e.g. <run>/checkpoints/best.pt of a finished "
            "run), or drop teacher.checkpoint to let the teacher store train one"))
        model = frozen_from_checkpoint(node, ckpt, data, device, "teacher.checkpoint",
                                       any_classes)
        info = {keys.TEACHER_SOURCE: "checkpoint",
                keys.TEACHER_CHECKPOINT: str(Path(node.checkpoint).expanduser())}
    # a frozen teacher is an inference-only graph: BN folded into its convs (models/fold.py)
    return model, {**info, keys.TEACHER_BN_FOLDED: fold_batchnorm(model) if fold else 0}
