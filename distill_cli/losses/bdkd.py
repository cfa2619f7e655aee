"""BD-KD-inspired online distillation — METHODS.md "BD-KD — Balancing the Divergences" [abstract].

Only the abstract was available: teacher and student both train from scratch; the student gets CE
plus a per-sample mix of forward KL(p_t‖p_s) and reverse KL(p_s‖p_t) driven by the entropy gap
(more forward KL when the student is over-confident, more reverse when under-confident); the
teacher gets CE plus a reverse-KL regulariser toward the (detached) student. The weighting
function, the weights and T below are OUR design ("BD-KD-inspired"), not the authors'.

As an `OnlineObjective` it gets the online-teacher topology (teachers/topology.py): a fresh
teacher in train mode with gradients and its own optimizer; `forward` sees detached teacher
logits and `teacher_terms` detached student logits, and one backward trains both.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import OnlineObjective, StepContext
from distill_cli.losses.functional import as_float, check_pair, kl_from_log_probs


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy `−Σ_c p_c log p_c` (nats, `[B]`) from log-probabilities."""
    return -(log_p.exp() * log_p).sum(dim=1)


def mix_weight(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               sharpness: float) -> torch.Tensor:
    """Per-sample forward-KL weight `w_i ∈ (0, 1)` (`[B]`, detached):

        w_i = sigmoid(sharpness · (H(p_t,i) − H(p_s,i)) / log C),   p = softmax(z)  (T = 1)

    Student over-confident (H_s < H_t) → w_i > ½ → more forward KL(p_t‖p_s), which is
    mass-covering and pulls the student's probability onto every class the teacher supports (its
    entropy up); under-confident (H_s > H_t) → more reverse KL(p_s‖p_t), which is mode-seeking
    and sharpens it. The gap is divided by log C, its largest possible size, so `sharpness`
    means the same for 10 and 1000 classes; `sharpness = 0` gives the fixed ½/½ mix. The
    entropies are those of the networks' actual predictions (T = 1), the ones whose
    (over-)confidence calibration is about; at a high KD temperature both are close to log C.
    """
    h_s = entropy(F.log_softmax(as_float(student_logits).detach(), dim=1))
    h_t = entropy(F.log_softmax(as_float(teacher_logits).detach(), dim=1))
    log_c = math.log(max(student_logits.shape[1], 2))
    return torch.sigmoid(float(sharpness) * (h_t - h_s) / log_c)


class BDKD(OnlineObjective):
    """BD-KD-inspired online KD (our design, METHODS.md [abstract]). With `p^T = softmax(z/T)`:

        student:  ce_weight·CE(s, y)
                  + kd_weight·T²·mean_i [w_i·KL(p_t^T ‖ p_s^T) + (1 − w_i)·KL(p_s^T ‖ p_t^T)]
        teacher:  teacher_ce_weight·CE(t, y) + teacher_rkl_weight·T²·mean_i KL(p_s^T ‖ p_t^T)

    `w_i` is `mix_weight` (entropy gap of the T = 1 predictions, detached). The student loss sees
    the teacher detached; the teacher loss sees the student detached (`teacher_terms`), so neither
    network's loss moves the other. Targets: `[B]` labels or `[B, C]` label distributions
    (mixup) — CE takes either.

    Terms (student): `loss`, `ce`, `kd` (mixed, T²-scaled, before kd_weight), `forward_kl`,
    `reverse_kl` (T²-scaled batch means), `mix_weight` (mean w_i). Teacher (`teacher_terms`;
    the engine logs them as `teacher_loss`, `teacher_ce`, `teacher_rkl`): `loss`, `ce`, `rkl`.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, sharpness: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 1.0, teacher_ce_weight: float = 1.0,
                 teacher_rkl_weight: float = 1.0):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"BD-KD temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4")
        if not float(sharpness) >= 0:
            raise UserError(f"BD-KD sharpness must be >= 0, got {sharpness}", key="loss.sharpness",
                            fix="use 0 for a fixed half/half mix, e.g. 4")
        for name, v in (("ce_weight", ce_weight), ("kd_weight", kd_weight),
                        ("teacher_ce_weight", teacher_ce_weight),
                        ("teacher_rkl_weight", teacher_rkl_weight)):
            if not float(v) >= 0:
                raise UserError(f"BD-KD {name} must be >= 0, got {v}", key=f"loss.{name}",
                                fix="use e.g. 1.0")
        self.temperature, self.sharpness = float(temperature), float(sharpness)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.teacher_ce_weight = float(teacher_ce_weight)
        self.teacher_rkl_weight = float(teacher_rkl_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        T = self.temperature
        s, t = as_float(student_logits), as_float(teacher_logits).detach()
        log_ps, log_pt = F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1)
        w = mix_weight(s, t, self.sharpness)
        fkl = kl_from_log_probs(log_pt, log_ps)   # KL(p_t ‖ p_s), [B]
        rkl = kl_from_log_probs(log_ps, log_pt)   # KL(p_s ‖ p_t), [B]
        kd = (w * fkl + (1 - w) * rkl).mean() * (T * T)
        ce = F.cross_entropy(s, targets)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(),
                "forward_kl": (fkl.mean() * T * T).detach(),
                "reverse_kl": (rkl.mean() * T * T).detach(), "mix_weight": w.mean()}

    def teacher_terms(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      targets: torch.Tensor, ctx: StepContext | None = None
                      ) -> dict[str, torch.Tensor]:
        """The online teacher's loss; the student logits are detached here (no gradient flows
        into the student through the regulariser, whatever the caller passes)."""
        check_pair(teacher_logits, student_logits)
        T = self.temperature
        t, s = as_float(teacher_logits), as_float(student_logits).detach()
        rkl = kl_from_log_probs(F.log_softmax(s / T, dim=1),
                                F.log_softmax(t / T, dim=1)).mean() * (T * T)
        ce = F.cross_entropy(t, targets)
        loss = self.teacher_ce_weight * ce + self.teacher_rkl_weight * rkl
        return {"loss": loss, "ce": ce.detach(), "rkl": rkl.detach()}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sharpness={self.sharpness}, "
                f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
                f"teacher_ce_weight={self.teacher_ce_weight}, "
                f"teacher_rkl_weight={self.teacher_rkl_weight}")
