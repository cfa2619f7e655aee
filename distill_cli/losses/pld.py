"""Plackett-Luce Distillation (PLD), as METHODS.md "PLD" [paper, incl. its code appendix]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_labels, check_pair


def pld_permutation(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The teacher-optimal order π* per sample ([B, C] class indices): the label first, then
    every other class by DESCENDING teacher logit (ties keep class order: stable sort).

    The label goes first even when the teacher ranks another class on top.
    """
    t = as_float(teacher_logits).detach()
    is_label = targets.unsqueeze(1) == torch.arange(t.shape[1], device=t.device)  # [B, C]
    key = t.masked_fill(is_label, float("inf"))
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def plackett_luce_loss(student_logits: torch.Tensor, perm: torch.Tensor,
                       position_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted Plackett-Luce loss ([B]):

        Σ_k w_k · (logsumexp_{l≥k} s_{π_l} − s_{π_k})

    `perm` [B, C]: the order π (class indices); `position_weights` [B, C]: w_k for position k of
    that order (NOT indexed by class). The tail log-sum-exp is a reverse cumulative
    `torch.logcumsumexp` of the permuted logits. With w = (1, 0, …, 0) this is CE(s, π_1).
    """
    s = as_float(student_logits).gather(1, perm)
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)   # [B, C]: lse_{l≥k} s_{π_l}
    return (position_weights * (tail_lse - s)).sum(dim=1)


class PLD(Objective):
    """Plackett-Luce Distillation: `mean_i Σ_k α_k·(logsumexp_{l≥k} s_{π*_l} − s_{π*_k})`.

    - π* = (y, then the other classes by DESCENDING teacher logit) — `pld_permutation`.
    - α_k = softmax(t/τ)[π*_k]: the teacher's probability of the class at position k, over ALL
      classes, NOT renormalised (they sum to 1 over the whole order).
    - The student logits are never temperature-scaled: τ acts on the teacher weights only.
    - No separate CE term (position 1 is already a teacher-weighted CE on the label) and no T².
    - Vectorised: the order is a per-row gather; the tail log-sum-exps come from one
      `torch.logcumsumexp` on the flipped permuted logits (no loop over samples or positions).

    Identities: α = (1, 0, …, 0) gives plain CE; adding a constant to every student logit of a
    row changes nothing.

    Options:
        temperature: τ of the teacher weights. 4.0 (default) = the paper's CIFAR runs;
            1.0 = best on ImageNet.

    Terms: `loss` (= `pld`), `pld`. The teacher logits are detached. Needs hard labels.
    """

    accepts_soft_targets = False  # indexes by the hard label

    needs_teacher = True
    uses_labels = True

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"PLD temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4 (CIFAR) or 1 (ImageNet)")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        check_labels(student_logits, targets)
        t = as_float(teacher_logits).detach()
        perm = pld_permutation(t, targets)
        alpha = F.softmax(t / self.temperature, dim=1).gather(1, perm)
        pld = plackett_luce_loss(student_logits, perm, alpha).mean()
        return {"loss": pld, "pld": pld.detach()}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
