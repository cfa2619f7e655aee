"""Generalized Knowledge Distillation's token-level loss, the generalized JSD (METHODS_FAMILIES.md B2)."""
from __future__ import annotations

import math

import torch

from distill_cli.errors import UserError
from distill_cli.tasks.lm.divergences import generalized_jsd
from distill_cli.tasks.lm.methods import TokenObjective, check_temperature


class GKD(TokenObjective):
    """GKD (Agarwal et al., ICLR 2024) as TRL's `GKDTrainer.generalized_jsd_loss`: per counted token

        m = β·p + (1−β)·q  (in probability space),   ℓ = β·KL(p ‖ m) + (1−β)·KL(q ‖ m)

    p = softmax(z_T/T), q = softmax(z_S/T), no T²; β = 0 → KL(p ‖ q), β = 1 → KL(q ‖ p), both
    UNSCALED (TRL's special cases: the value jumps ~1/β at the endpoints).
    loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: huggingface/trl@f2cd5771 `trl/experimental/gkd/gkd_trainer.py:238-323` (the mixture
    `logsumexp(stack[log q + log1p(−β), log p + log β])` :287-290; endpoints :279-282; "batchmean"
    = Σ over `labels != -100` / their count :301-317), called at :422-428 with the default
    temperature 1.0 and no CE term → defaults β 0.5 (`gkd_config.py` `beta`), T 1, kd_weight 1,
    ce_weight 0. Our reduction is TRL's batchmean (a per-token mean); under gradient accumulation
    TRL divides by `num_items_in_batch` instead.

    `lmbda` (TRL `GKDConfig.lmbda`): accepted and checked but UNUSED — this loss is off-policy
    (λ = 0: it never samples). TRL's on-policy steps (a fraction λ of steps trained on the
    student's own samples, at sampling temperature 0.9) are loss=gkd_onpolicy
    (methods/onpolicy.py).
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, lmbda: float = 0.5,
                 kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(kd_weight, ce_weight)
        beta, lmbda = float(beta), float(lmbda)
        if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
            raise UserError(f"GKD beta must be in [0, 1], got {beta}", "loss.beta",
                            "use 0.5 (TRL default); 0 = forward KL, 1 = reverse KL")
        if not (math.isfinite(lmbda) and 0.0 <= lmbda <= 1.0):
            raise UserError(f"GKD lmbda (the on-policy fraction) must be in [0, 1], got {lmbda}",
                            "loss.lmbda", "use 0.5 (TRL default); 0 = dataset outputs only")
        self.beta, self.lmbda = beta, lmbda
        self.temperature = check_temperature(temperature)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return generalized_jsd(student_logits, teacher, self.beta, self.temperature)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, lmbda={self.lmbda}, "
                f"{super().extra_repr()}")
