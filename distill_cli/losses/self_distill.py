"""Self-distillation with ground-truth guidance (Borup & Andersen) — METHODS.md [code].

Generation τ of the same architecture (freshly initialised) learns from generation τ−1 and the
labels; `distill_cli.training.generations` runs the generations and picks α per generation (`auto`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_pair, label_distribution


class SelfDistill(Objective):
    """`α·MSE(softmax(s), onehot(y)) + (1−α)·MSE(softmax(s), softmax(t))`.

    MSE on PROBABILITIES (T = 1), element mean over `[B, C]` (`F.mse_loss` default) — the
    authors' code; α weights the GROUND TRUTH (α = 1: labels only, α = 0: teacher only). No CE.
    Targets: `[B]` labels, or `[B, C]` label distributions (mixup) used as the label target.

    Terms: `loss`; `label_mse`, `teacher_mse` (before their weights). Teacher logits detached.
    """

    needs_teacher = True

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        if alpha == "auto":
            raise UserError("alpha=auto chooses α per generation, so it needs generations",
                            "self_distill.alpha", "Set self_distill.generations>=1, or give a "
                            "number in [0, 1]")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0.0 <= float(alpha) <= 1.0:
            raise UserError(f"self-distillation alpha must be in [0, 1] (or auto), got {alpha!r}",
                            "self_distill.alpha", "Use e.g. 0.5, or auto")
        self.alpha = float(alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        p = F.softmax(as_float(student_logits), dim=1)
        y = label_distribution(targets, p.shape[0], p.shape[1], p.dtype)
        label_mse = F.mse_loss(p, y)
        teacher_mse = F.mse_loss(p, F.softmax(as_float(teacher_logits).detach(), dim=1))
        loss = self.alpha * label_mse + (1 - self.alpha) * teacher_mse
        return {"loss": loss, "label_mse": label_mse.detach(),
                "teacher_mse": teacher_mse.detach()}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
