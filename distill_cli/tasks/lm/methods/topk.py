"""Top-k logit distillation with a missing-mass bucket (METHODS_FAMILIES.md B6, DistillKit)."""
from __future__ import annotations

import torch

from distill_cli.errors import UserError
from distill_cli.tasks.lm.divergences import topk_kl, topk_kl_live
from distill_cli.tasks.lm.methods import (
    TokenObjective,
    check_temperature,
    vocab_mismatch,
)


class TopK(TokenObjective):
    """Top-k KD: per counted token the exact KL of the (k+1)-bin collapsed distributions

        ℓ = T²·[ Σ_{i≤k} p_i (log p_i − log q_i) + P (log P − log Q) ],
        P = 1 − Σ_i p_i,  Q = 1 − Σ_i q_i

    over the teacher's k most likely tokens, the student's log q_i normalised over the FULL
    vocabulary. k = V gives T²·KL(p ‖ q) exactly. loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: arcee-ai/DistillKit@a61c2e7d `distillkit/lossfuncs/kl.py:17-87` (`sparse_kl_div_inner`,
    `MissingProbabilityHandling.SYMMETRIC_UNIFORM` bucket :57-69), `lossfuncs/common.py:14-137`
    (student log-probs with the full log-sum-exp :119-124; tempering stored log-probs
    `p^(T_gen/T)` with the bucket `(1−Σp)^(T_gen/T)`, renormalised :36-67), reduction
    `Σ_masked · T² / num_items_in_batch` (`kl.py:205-231`); default mix 0.5·CE + 0.5·KL, T 1.0
    (`configuration.py:167-181`) → defaults kd_weight 0.5, ce_weight 0.5, T 1. DistillKit's
    config default is the ZERO handling (renormalise the top k, no bucket); this runner's
    design uses the bucket (exact at k = V). k: 128 as DistillKit's README stores.
    Ours: per-token mean over the counted tokens (= theirs without gradient accumulation).

    Teacher signal: live `[B, T, V]` logits (packed on the fly, same values as stored), or the
    output store's packed rows `[B, T, 2k']` (`divergences.pack_topk`: top-k' log-probabilities
    descending, then indices); a row with k' > k is cut to its first k (still the top k). The
    two are told apart by the last dimension (V: dense).
    """

    accepts_topk = True

    def __init__(self, k: int = 128, temperature: float = 1.0, kd_weight: float = 0.5,
                 ce_weight: float = 0.5):
        super().__init__(kd_weight, ce_weight)
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise UserError(f"top-k k must be a whole number >= 1, got {k!r}", "loss.k",
                            "use e.g. 128 (DistillKit's README)")
        self.k = int(k)
        self.temperature = check_temperature(temperature)

    def teacher_signal(self, teacher_logits, student_logits):
        if teacher_logits is None:
            raise ValueError("TopK needs teacher logits or packed top-k rows, got None")
        V = student_logits.shape[-1]
        if self.k > V:
            raise UserError(f"top-k k = {self.k} exceeds the vocabulary size {V}", "loss.k",
                            f"use k <= {V}")
        if teacher_logits.dim() != 3 or teacher_logits.shape[:2] != student_logits.shape[:2]:
            raise ValueError(f"teacher outputs {tuple(teacher_logits.shape)} do not match the "
                             f"student's [B, T] = {list(student_logits.shape[:2])}")
        width = teacher_logits.shape[-1]
        if width == V:
            return teacher_logits
        if width % 2 or width // 2 > V:
            raise vocab_mismatch(width, V)
        stored = width // 2
        if stored < self.k:
            raise UserError(f"the stored teacher outputs hold the top {stored} tokens per "
                            f"position, fewer than loss.k = {self.k}", "loss.k",
                            f"use k <= {stored}, or store the teacher's outputs again with a "
                            "larger k")
        if stored == self.k:
            return teacher_logits
        return torch.cat([teacher_logits[..., :self.k],
                          teacher_logits[..., stored:stored + self.k]], dim=-1)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        if teacher.shape[-1] == student_logits.shape[-1]:
            value = topk_kl_live(student_logits, teacher, self.k, T)
        else:
            value = topk_kl(student_logits, teacher, T)
        return value * (T * T)

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}, {super().extra_repr()}"
