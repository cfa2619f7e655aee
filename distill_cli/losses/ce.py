"""Plain cross-entropy: how teachers are trained, and the no-distillation baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 logits are upcast to float32 for the loss; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 targets: torch.Tensor, needs_teacher: bool) -> None:
    """Shape checks only (no value checks: those would force a device sync)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if targets.shape != student_logits.shape[:1] and not (
            targets.shape == student_logits.shape and targets.is_floating_point()):
        raise ValueError(f"targets must be [B] = [{student_logits.shape[0]}] class indices or "
                         f"[B, C] label distributions (mixup), got shape {tuple(targets.shape)}")
    if needs_teacher:
        if teacher_logits is None:
            raise ValueError("this objective needs teacher logits, got None")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} must have the same shape [B, C]")


class CrossEntropy(Objective):
    """`CE(s, y)`, mean over the batch (`torch.nn.functional.cross_entropy`).

    Options:
        label_smoothing: ε of `(1−ε)·onehot + ε/C` targets, as in torch; 0 = plain CE.

    Terms: `loss` (= `ce`), `ce`.
    """

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}",
                            key="loss.label_smoothing", fix="use e.g. 0.0 or 0.1")
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_logits(student_logits, teacher_logits, targets, needs_teacher=False)
        ce = F.cross_entropy(_as_float(student_logits), targets,
                             label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
