"""SSLD — Simple Semi-supervised Label Distillation (PaddleClas), as METHODS.md "SSLD" [code:
PaddleClas `ppcls/loss/dmlloss.py` `DMLLoss`, used by `DistillationDMLLoss` in the SSLD configs]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_labels, check_pair, kl_from_log_probs


def symmetric_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-sample `½[KL(p_t ‖ p_s) + KL(p_s ‖ p_t)]` ([B]), `p = softmax(z/T)`, no T².

    From log_softmax on both sides (PaddleClas adds 1e-10 inside its logs; on ordinary logits
    the values agree). The teacher is detached; the student gets the gradient of both KLs.
    """
    log_ps = F.log_softmax(as_float(student_logits) / temperature, dim=1)
    log_pt = F.log_softmax(as_float(teacher_logits).detach() / temperature, dim=1)
    return 0.5 * (kl_from_log_probs(log_pt, log_ps) + kl_from_log_probs(log_ps, log_pt))


class SSLD(Objective):
    """SSLD: `½[KL(p_t ‖ p_s) + KL(p_s ‖ p_t)]` batchmean (+ `ce_weight·CE`, off by default).

    `p = softmax(z/T)` with T = 1 in SSLD (the official loss has no temperature; T ≠ 1 is our
    extension and, like the official, has NO T² factor). The PaddleClas docs call this loss "JS"
    but it is the symmetric KL, not the Jensen-Shannon divergence.

    Label-free: with ce_weight = 0 (default) `targets` are never read and may be None, so the
    objective can train on unlabeled extra data. `uses_labels` says so (class attribute False;
    an instance with ce_weight > 0 sets it True and then requires hard labels).

    Terms: `loss`; `skl` (the symmetric KL); `ce` (only when ce_weight > 0, before ce_weight).
    The teacher logits are detached.
    """

    needs_teacher = True
    uses_labels = False

    def __init__(self, temperature: float = 1.0, ce_weight: float = 0.0):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"SSLD temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use 1 (SSLD)")
        if float(ce_weight) < 0:
            raise UserError(f"SSLD ce_weight must be >= 0, got {ce_weight}", key="loss.ce_weight",
                            fix="use 0 (label-free SSLD) or a positive weight")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.uses_labels = self.ce_weight > 0

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor | None, ctx: StepContext | None = None
                ) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        skl = symmetric_kl(student_logits, teacher_logits, self.temperature).mean()
        out = {"loss": skl, "skl": skl.detach()}
        if self.ce_weight > 0:
            check_labels(student_logits, targets)
            ce = F.cross_entropy(as_float(student_logits), targets)
            out["loss"] = skl + self.ce_weight * ce
            out["ce"] = ce.detach()
        return out

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ce_weight={self.ce_weight}"
