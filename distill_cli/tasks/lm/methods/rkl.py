"""Token-level reverse KL distillation (METHODS_FAMILIES.md B1)."""
from __future__ import annotations

import torch

from distill_cli.tasks.lm.divergences import reverse_kl
from distill_cli.tasks.lm.methods import TokenObjective, check_temperature


class RKL(TokenObjective):
    """Reverse KL, mode-seeking: per counted token

        ℓ = T²·KL(q ‖ p) = T²·Σ_v q(v) [log q(v) − log p(v)],  p = softmax(z_T/T), q = softmax(z_S/T)

    the gradient flowing through q in both factors. loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: jongwooko/distillm@d47e77ff `distillm/losses.py:14-24` (`reverse_kl`): per-token mean
    over `label != -100`, no temperature, kd_ratio 1.0 → defaults kd_weight 1, ce_weight 0, T 1.
    Ours: the same value (a true KL); the optional temperature with T² is Hinton's convention.
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(kd_weight, ce_weight)
        self.temperature = check_temperature(temperature)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        return reverse_kl(student_logits, teacher, T) * (T * T)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"
