"""What the step-distillation methods share: reaching the Denoiser behind a DDP wrapper, checking
and initialising students from teachers, frozen copies held as buffers, per-example distances,
and the stored (noise, endpoint) pairs the runner hands over. The per-sample random draws
(`SampleDraws`, `NoiseSeeded`: what makes a torchrun run compute what one process computes) live
in distill_cli/draws.py, shared with the language-model family's on-policy sampling."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from distill_cli.errors import UserError
from distill_cli.models.diffusion.denoiser import Denoiser


def unwrap(model: nn.Module) -> nn.Module:
    """The Denoiser inside a DistributedDataParallel wrapper (its methods are not forwarded)."""
    return getattr(model, "module", model)


def check_denoiser(model, role: str, method: str) -> Denoiser:
    """`model` as a Denoiser, or a UserError naming `role` (student | teacher)."""
    model = unwrap(model) if model is not None else None
    if not isinstance(model, Denoiser):
        kind = "no model" if model is None else type(model).__name__
        raise UserError(f"loss={method} needs a diffusion {role} (a Denoiser), got {kind}", role,
                        f"Use task=diffusion with a diffusion {role} (unet_tiny, unet_small, "
                        "dit_tiny) trained by the store with loss@teacher.train.loss=dsm")
    return model


def copy_teacher_weights(student: Denoiser, teacher: Denoiser, method: str) -> None:
    """Start the student's backbone from the teacher's weights; the same architecture (state
    keys and shapes) is required. UserError key `student` otherwise."""
    s_state, t_state = student.net.state_dict(), teacher.net.state_dict()
    bad = sorted(k for k in set(s_state) | set(t_state)
                 if k not in s_state or k not in t_state or s_state[k].shape != t_state[k].shape)
    if bad or type(student.net) is not type(teacher.net):
        first = bad[0] if bad else "the backbone class"
        raise UserError(
            f"loss={method} starts the student from the teacher's weights, but the student's "
            f"backbone ({type(student.net).__name__}, {len(s_state)} tensors) differs from the "
            f"teacher's ({type(teacher.net).__name__}, {len(t_state)} tensors); first difference: "
            f"{first}", "student",
            "Give the student the teacher's architecture and width (the same student=... and "
            "options the teacher was trained with, and the same task.conditional)")
    with torch.no_grad():
        student.net.load_state_dict(t_state)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are BUFFERS: it is in the owner's `state_dict()`
    (saved in checkpoints, restored on resume) and never in its `parameters()` (the optimizer
    trains the objective's parameters as heads)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        for name, param in list(module._parameters.items()):
            del module._parameters[name]
            if param is not None:
                module.register_buffer(name, param.detach().clone())
    return clone


def adopt_teacher_guidance(student: Denoiser, teacher: Denoiser) -> None:
    """A student trained on a GUIDED teacher's predictions (or samples) has the guidance baked
    in: it samples as the plain conditional model (w = 1), never guided again."""
    if teacher.conditional and teacher.guidance != 1.0:
        student.guidance = 1.0


def power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def per_sample_mean(x: Tensor) -> Tensor:
    """The mean over every dimension but the batch one ("mean over dims")."""
    return x.flatten(1).mean(1)


def col(values: Tensor, like: Tensor) -> Tensor:
    """[B] coefficients as a [B, 1, 1, 1] column in `like`'s dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def positive_int(value, key: str) -> int:
    """A positive integer option, or a UserError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or int(value) < 1:
        raise UserError(f"{key.split('.')[-1]} must be an integer >= 1, got {value!r}", key,
                        "Give a positive whole number")
    return int(value)


def distance(a: Tensor, b: Tensor, kind: str, huber_c: float | None) -> Tensor:
    """Per-example distance: l2 = mean_dims (a-b)^2, l1 = mean_dims |a-b| (CM :205-212);
    pseudo_huber = sqrt(||a-b||^2 + c^2) - c over ALL dims, c = 0.00054 sqrt(d) by default
    (Song & Dhariwal 2023, improved CT)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return (diff ** 2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if huber_c is None else float(huber_c)
    return torch.sqrt((diff ** 2).sum(1) + c * c) - c


def check_distance(kind: str, allowed: tuple[str, ...]) -> str:
    if kind == "lpips":
        raise UserError("LPIPS needs VGG weights downloaded from the internet, which this "
                        "runner cannot fetch offline", "loss.distance",
                        "Use loss.distance=pseudo_huber (Song & Dhariwal 2023's LPIPS-free "
                        "replacement) or l2")
    if kind not in allowed:
        raise UserError(f"unknown distance {kind!r}", "loss.distance",
                        f"Use one of: {', '.join(allowed)}")
    return kind


def pair_batch(objective, batch, dtype) -> tuple[Tensor, Tensor]:
    """The (noise, endpoint) pairs of `batch.index`, handed over by the runner (`use_samples`:
    training/teacher_setup.py serves teachers/samples.py's kind "pairs", i.e.
    distill_cli/teachers/pairs.py's `teacher_pairs`, built from the teacher and
    `objective.samples_options` once into the output store)."""
    if objective.pairs is None:
        raise RuntimeError(f"loss={objective.name} trains on the teacher's stored pairs, but "
                           "none were handed to it (use_samples) before its first step")
    noise, endpoint = objective.pairs.get(batch.index)
    return noise.to(dtype), endpoint.to(dtype)


def pairs_options(node) -> dict:
    """The `pairs` node as teacher_pairs' keyword options (the runner adds store_root)."""
    return dict(node or {})


class StoredPairs:
    """Mixin of the methods that train on the teacher's stored (noise, endpoint) pairs: the
    runner builds them once (teachers/samples.py, kind "pairs") from `samples_options` (the
    YAML's `pairs:` node) and hands them over with `use_samples`."""

    stored_samples = "pairs"

    def init_pairs(self, node) -> None:
        self.samples_options = pairs_options(node)
        self.pairs = None

    def use_samples(self, pairs) -> None:
        """The runner hands over the teacher's pairs (`get(index) -> (noise, endpoint)`)."""
        self.pairs = pairs
