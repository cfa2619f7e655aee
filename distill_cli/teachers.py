"""Resolve the teacher: none, or an architecture plus a checkpoint, checked against the
dataset before any training starts. The teacher is frozen, in eval mode, never optimised."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from . import checkpoint
from .build import build_model, model_node
from .errors import UserError


def check_compatible(ckpt: dict, arch: DictConfig, data, key: str) -> None:
    """The checkpoint must hold this architecture, trained for this dataset's classes/inputs."""
    saved_arch = ckpt["model_config"].get("arch")
    if saved_arch != arch.arch:
        raise UserError(f"The checkpoint holds a `{saved_arch}` but teacher={arch.arch} was asked "
                        "for", "teacher", f"Set teacher={saved_arch}, or point "
                        f"`{key}` at a {arch.arch} checkpoint")
    saved = ckpt.get("data", {})
    if saved.get("num_classes") != data.num_classes:
        raise UserError(f"The teacher checkpoint was trained for {saved.get('num_classes')} "
                        f"classes ({saved.get('name')}) but dataset {data.name} has "
                        f"{data.num_classes}", key,
                        "Use a teacher trained on the same dataset (train one with "
                        f"`distill dataset=... teacher=none student={arch.arch} loss=ce`)")
    if list(saved.get("input_shape", []))[:1] != list(data.input_shape)[:1]:
        raise UserError(f"The teacher expects {saved.get('input_shape')} inputs but dataset "
                        f"{data.name} gives {list(data.input_shape)}", key,
                        "Use a teacher trained on the same kind of input")


def load_teacher(node: DictConfig, data, device: torch.device) -> nn.Module | None:
    arch = model_node(node)
    if arch is None:
        if node.get("checkpoint"):
            raise UserError("`teacher.checkpoint` is set but teacher=none", "teacher",
                            "Also name the teacher architecture, e.g. teacher=resnet20")
        return None
    if not node.get("checkpoint"):
        raise UserError(f"teacher={arch.arch} needs trained weights", "teacher.checkpoint",
                        "Pass teacher.checkpoint=<run>/checkpoints/best.pt (a run of "
                        f"`distill teacher=none student={arch.arch} loss=ce ...`)")
    ckpt = checkpoint.load(node.checkpoint, "teacher.checkpoint")
    check_compatible(ckpt, arch, data, "teacher.checkpoint")
    model = build_model(node, "teacher", data)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"The teacher checkpoint does not fit teacher={arch.arch} with these "
                        f"options ({str(exc).splitlines()[0][:160]})", "teacher",
                        "Use the same architecture options the teacher was trained with "
                        f"(saved: {ckpt['model_config']})") from None
    return model.to(device).eval().requires_grad_(False)
