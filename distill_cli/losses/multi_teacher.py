"""Multi-teacher KD with similarity-weighted teachers — DistillNearest / DistillWeighted-inspired
(METHODS.md [abstract]; the score, the weighting and the loss are OUR design).

The K teachers come from the top-level `teachers` list; `distill_cli.teachers.pool` puts each in
this dataset's class space and scores its task similarity ONCE, before training (the score is
documented there). This objective turns the scores into per-teacher weights and distils the
weighted mixture of the teachers' softened outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import PoolObjective, StepContext
from distill_cli.losses.functional import as_float, kl_from_log_probs

WEIGHTINGS = ("mean", "nearest", "similarity")


def mixture_log_probs(teacher_logits: torch.Tensor, weights: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """`log Σ_k w_k·softmax(t_k / T)` (`[B, C]`) from `[K, B, C]` logits and `[K]` weights,
    as a logsumexp of `log w_k + log_softmax(t_k / T)`: exact for zero weights (`nearest`)."""
    log_p = F.log_softmax(as_float(teacher_logits).detach() / temperature, dim=2)
    log_w = torch.log(weights.to(log_p.dtype)).view(-1, 1, 1)
    return torch.logsumexp(log_w + log_p, dim=0)


class MultiTeacher(PoolObjective):
    """`ce_weight·CE(s, y) + kd_weight·T²·KL(q ‖ softmax(s/T))`, batchmean, with the target

        q = Σ_k w_k·softmax(t_k / T)          (a weighted average of PROBABILITIES)

    Weights from the teachers' task-similarity scores `a_k` (set once by the launcher with
    `set_scores`; saved in checkpoints as the buffer `teacher_weights`):

        mean:        w_k = 1/K                         (scores only logged)
        nearest:     w = one-hot(argmax_k a_k)         (DistillNearest-inspired; first on ties)
        similarity:  w = softmax(a / tau)              (DistillWeighted-inspired)

    Without scores (direct calls) the weights are equal. Teacher logits: `[K, B, C]`, or `[B, C]`
    for one teacher (then this is Hinton KD). Terms: `loss`, `ce`, `kd` (T²·KL before kd_weight).
    """

    needs_teacher = True
    # several frozen teachers; each one's outputs are served from the output store like a
    # single teacher's (teacher.outputs), stacked [K, B, C]

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 weights: str = "similarity", tau: float = 0.05):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"multi_teacher temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4")
        if weights not in WEIGHTINGS:
            raise UserError(f"multi_teacher weights={weights!r} is not an option",
                            key="loss.weights", fix=f"use one of {', '.join(WEIGHTINGS)}")
        if not float(tau) > 0:
            raise UserError(f"multi_teacher tau must be > 0, got {tau}", key="loss.tau",
                            fix="use e.g. 0.05 (scores are accuracies in [0, 1])")
        self.temperature, self.tau, self.weighting = float(temperature), float(tau), weights
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.register_buffer("teacher_weights", torch.zeros(0))

    def weights_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """`[K]` scores → `[K]` weights summing to 1 (see the class docstring)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if self.weighting == "mean":
            return torch.full_like(scores, 1.0 / scores.numel())
        if self.weighting == "nearest":
            return F.one_hot(scores.argmax(), scores.numel()).to(torch.float64)
        return torch.softmax(scores / self.tau, dim=0)

    def set_scores(self, scores) -> None:
        self.teacher_weights = self.weights_from_scores(scores).float().to(
            self.teacher_weights.device)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            raise ValueError("multi_teacher needs teacher logits, got None")
        t = teacher_logits.unsqueeze(0) if teacher_logits.dim() == 2 else teacher_logits
        if t.dim() != 3 or t.shape[1:] != student_logits.shape:
            raise ValueError(f"teacher logits must be [K, B, C] with [B, C] = "
                             f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
        w = self.teacher_weights
        if w.numel() == 0:
            w = torch.full((t.shape[0],), 1.0 / t.shape[0], device=t.device)
        elif w.numel() != t.shape[0]:
            raise ValueError(f"{w.numel()} teacher weights for {t.shape[0]} teachers")
        T = self.temperature
        s = as_float(student_logits)
        log_q = mixture_log_probs(t, w, T)
        kd = kl_from_log_probs(log_q, F.log_softmax(s / T, dim=1)).mean() * (T * T)
        ce = F.cross_entropy(s, targets)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, weights={self.weighting}, tau={self.tau}")
