"""The token-level language-model objectives, one file per method (their YAMLs are
distill_cli/conf/loss/<name>.yaml), and `TokenObjective`, the shape checks, padding mask and
weighting they share. Formulas: distill_cli/tasks/lm/divergences.py."""
from __future__ import annotations

import math

import torch

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float
from distill_cli.tasks.lm.divergences import counted, token_mean, token_nll


def next_token_ce(s: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  trained: bool) -> torch.Tensor:
    """The masked next-token CE of every LM objective: in the graph when it is trained
    (`ce_weight > 0`), else logged only (no graph)."""
    if trained:
        return token_mean(token_nll(s, targets), mask)
    with torch.no_grad():
        return token_mean(token_nll(s, targets), mask)


def check_student(student_logits: torch.Tensor, targets: torch.Tensor | None) -> None:
    """`[B, T, V]` logits and `[B, T]` integer next-token targets (shape checks only: a value
    check would cost a host-device sync every step)."""
    if student_logits.dim() != 3:
        raise ValueError(f"LM student logits must be [B, T, V], got {tuple(student_logits.shape)}")
    if targets is None or targets.shape != student_logits.shape[:2] or targets.is_floating_point():
        got = None if targets is None else (tuple(targets.shape), targets.dtype)
        raise ValueError(f"LM targets must be [B, T] = {list(student_logits.shape[:2])} integer "
                         f"token ids (-100 = not counted), got {got}")


def vocab_mismatch(teacher_vocab: int, student_vocab: int) -> UserError:
    return UserError(
        f"the teacher's outputs have {teacher_vocab} entries per token but the student's "
        f"vocabulary has {student_vocab}", "loss",
        "Teacher and student must share the tokenizer (one vocabulary). Stored top-k teacher "
        "outputs are read only by loss=topk; the other LM losses need the teacher's full logits "
        "(a live teacher, or dense stored outputs)")


def check_weight(value: float, key: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{key} must be a finite number >= 0, got {value}", f"loss.{key}",
                        "use e.g. 1.0 (on) or 0.0 (off)")
    return value


def check_temperature(value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"temperature must be > 0, got {value}", "loss.temperature",
                        "use 1.0 (the authors' setting) or e.g. 2.0")
    return value


def check_alpha(value: float) -> float:
    """A skew mixture weight: α = 1 would compare a distribution with itself (loss 0, no
    gradient), so [0, 1)."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise UserError(f"skew alpha must be in [0, 1), got {value}", "loss.alpha",
                        "use 0.1 (DistiLLM's --skew-alpha default); 0 = plain KL")
    return value


class TokenObjective(Objective):
    """`kd_weight·mean_tok D(p_t, q_s) + ce_weight·mean_tok NLL(y)` over the COUNTED tokens
    (`targets != -100`). Subclasses give the per-position divergence `divergence(s, t)`.

    The teacher signal is detached; logits (and packed rows) at padded positions are replaced
    by zeros before any arithmetic, so whatever the padding holds never reaches the loss or its
    gradient. Terms: `loss`; `kd` (the averaged divergence, with T² where the method has it,
    before kd_weight); `ce` (the student's next-token NLL, before ce_weight — logged always).
    """

    task_name = "lm"
    needs_teacher = True
    accepts_soft_targets = False  # targets are token ids; mixup/CutMix have no meaning here
    #: True only for objectives that read stored top-k rows `[B, T, 2k]`
    accepts_topk = False

    def __init__(self, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__()
        self.kd_weight = check_weight(kd_weight, "kd_weight")
        self.ce_weight = check_weight(ce_weight, "ce_weight")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise UserError("kd_weight and ce_weight are both 0: the loss would be 0 and train "
                            "nothing", "loss.kd_weight", "set kd_weight (and/or ce_weight) > 0")

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-position divergence `[B, T]` (already including any T² factor)."""
        raise NotImplementedError

    def teacher_signal(self, teacher_logits: torch.Tensor | None, student_logits: torch.Tensor
                       ) -> torch.Tensor:
        """Checks the teacher's `[B, T, V]` logits (subclasses may accept other forms)."""
        if teacher_logits is None:
            raise ValueError(f"{type(self).__name__} needs teacher logits, got None")
        if teacher_logits.shape[:2] != student_logits.shape[:2] or teacher_logits.dim() != 3:
            raise ValueError(f"teacher outputs {tuple(teacher_logits.shape)} do not match the "
                             f"student's [B, T] = {list(student_logits.shape[:2])}")
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise vocab_mismatch(teacher_logits.shape[-1], student_logits.shape[-1])
        return teacher_logits

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_student(student_logits, targets)
        mask = counted(targets)
        keep = mask.unsqueeze(-1)
        s = torch.where(keep, as_float(student_logits), 0.0)
        t = self.teacher_signal(teacher_logits, student_logits)
        t = torch.where(keep, as_float(t).detach(), 0.0)
        kd = token_mean(self.divergence(s, t), mask)
        ce = next_token_ce(s, targets, mask, self.ce_weight > 0)
        loss = self.kd_weight * kd + self.ce_weight * ce
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}

    def extra_repr(self) -> str:
        return f"kd_weight={self.kd_weight}, ce_weight={self.ce_weight}"
