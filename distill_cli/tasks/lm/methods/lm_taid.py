"""TAID per token for language models (METHODS_FAMILIES.md B4): the classifier TAID's schedule of
t (distill_cli/losses/taid.py, inherited, not copied) with a masked per-token loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.functional import as_float
from distill_cli.losses.taid import TAID
from distill_cli.tasks.lm.divergences import counted, log_probs, token_mean
from distill_cli.tasks.lm.methods import (check_student, check_weight, next_token_ce,
                                          vocab_mismatch)


class LMTAID(TAID):
    """TAID (Shing et al., ICLR 2025) on next-token distributions: per counted token

        p_t = softmax((1 − t)·stopgrad(z_S) + t·z_T)     (interpolation in LOGIT space)
        ℓ = −Σ_v p_t(v) log q(v)                          (cross-entropy form, as the authors)

    taid = mean_tok ℓ over `targets != -100`; loss = kd_weight·taid + ce_weight·mean_tok NLL.
    The gradient reaches only log q (p_t uses the detached student and the detached teacher).

    Source: SakanaAI/TAID@a0628922 `src/distil_losses/taid.py:66-80` (`compute_loss`) with
    `src/distil_losses/fkl.py:10-25` (`forward_kl`: −Σ_masked Σ_v p log q / #masked, T = 1);
    distil_ratio 1.0 (no CE) → kd_weight 1, ce_weight 0. The schedule of t (taid.py:38-64) is
    the classifier TAID's `after_step`, unchanged and fed the same J = `terms["taid"]` (the
    per-token mean, as `update_t(loss)` gets it): padding never enters J, so it never moves t.
    See distill_cli/losses/taid.py for the schedule's options and its one deviation (t moves once
    per optimizer step, never in evaluation). Terms: loss, taid, ce (always logged), t, momentum.
    """

    task_name = "lm"
    accepts_soft_targets = False
    accepts_topk = False

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, schedule: str = "adaptive", kd_weight: float = 1.0,
                 ce_weight: float = 0.0):
        super().__init__(t_start=t_start, t_end=t_end, alpha=alpha, beta=beta,
                         schedule=schedule, ce_weight=ce_weight)
        self.kd_weight = check_weight(kd_weight, "kd_weight")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise UserError("kd_weight and ce_weight are both 0: the loss would be 0 and train "
                            "nothing", "loss.kd_weight", "set kd_weight (and/or ce_weight) > 0")
        self.uses_labels = True  # the targets' -100 marks are the mask, whatever ce_weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_student(student_logits, targets)
        if teacher_logits is None or teacher_logits.shape != student_logits.shape:
            if teacher_logits is not None and teacher_logits.shape[:2] == student_logits.shape[:2]:
                raise vocab_mismatch(teacher_logits.shape[-1], student_logits.shape[-1])
            got = None if teacher_logits is None else tuple(teacher_logits.shape)
            raise ValueError(f"LMTAID needs teacher logits {tuple(student_logits.shape)}, got {got}")
        mask = counted(targets)
        keep = mask.unsqueeze(-1)
        s = torch.where(keep, as_float(student_logits), 0.0)
        tl = torch.where(keep, as_float(teacher_logits).detach(), 0.0)
        t = self.t.to(s.dtype)
        with torch.no_grad():
            target = F.softmax((1 - t) * s.detach() + t * tl, dim=-1)
        # slots with p_t = 0 count 0 (the authors' inf_mask): a -inf student logit there
        # would otherwise make 0·(−inf) = NaN
        xent = torch.where(target > 0, target * log_probs(s), 0.0)
        taid = token_mean(-xent.sum(-1), mask)
        ce = next_token_ce(s, targets, mask, self.ce_weight > 0)
        loss = self.kd_weight * taid + self.ce_weight * ce
        # copies: after_step updates the buffers in place after this step's terms are returned
        return {"loss": loss, "taid": taid.detach(), "ce": ce.detach(),
                "t": self.t.to(dtype=taid.dtype, copy=True),
                "momentum": self.momentum.to(dtype=taid.dtype, copy=True)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kd_weight={self.kd_weight}"
