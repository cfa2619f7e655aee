"""Hinton knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in
a Neural Network")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.ce import _as_float, check_logits


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          temperature: float) -> torch.Tensor:
    """Per-sample `KL(p_t^T ‖ p_s^T)` ([B], no T², no weights), from log_softmax on both sides.

    The teacher is detached here: it never receives a gradient.
    """
    log_ps = F.log_softmax(_as_float(student_logits) / temperature, dim=1)
    log_pt = F.log_softmax(_as_float(teacher_logits).detach() / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)


class KD(Objective):
    """Hinton KD: `ce_weight·CE(s, y) + kd_weight·T²·KL(p_t^T ‖ p_s^T)`.

    `p^T = softmax(z / T)`; the KL is "batchmean" (sum over classes, mean over the batch) and is
    computed from log-probabilities on both sides (`F.kl_div(..., log_target=True)`).

    Weighting: timm style (`timm.task.LogitDistillationTask` with both weights given, and
    mdistiller's `KD`): two INDEPENDENT weights, `ce_weight` on the plain (T=1) CE and
    `kd_weight` on the T²-scaled KL. They are not tied to sum to 1 and T² is not folded into
    them — to get the convex `(1−α)·CE + α·T²·KL` form set `ce_weight = 1−α, kd_weight = α`.
    CE uses the hard labels and no label smoothing.

    Standard settings (METHODS.md, mdistiller configs):
        CIFAR-100:     T=4, ce_weight=0.1, kd_weight=0.9  (the defaults here)
        ImageNet-1k:   T=1, ce_weight=0.5, kd_weight=0.5

    Terms: `loss`; `ce` (CE before ce_weight); `kd` (T²·KL before kd_weight).
    The teacher logits are detached.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"KD temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4 (CIFAR) or 1 (ImageNet)")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_logits(student_logits, teacher_logits, targets, needs_teacher=True)
        T = self.temperature
        ce = F.cross_entropy(_as_float(student_logits), targets)
        kd = kd_kl(student_logits, teacher_logits, T).mean() * (T * T)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}"
