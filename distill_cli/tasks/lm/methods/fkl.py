"""Token-level forward KL distillation (METHODS_FAMILIES.md B1)."""
from __future__ import annotations

import torch

from distill_cli.tasks.lm.divergences import forward_kl
from distill_cli.tasks.lm.methods import TokenObjective, check_temperature


class FKL(TokenObjective):
    """Forward KL, mode-covering: per counted token

        ℓ = T²·KL(p ‖ q) = T²·Σ_v p(v) [log p(v) − log q(v)],  p = softmax(z_T/T), q = softmax(z_S/T)

    loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: jongwooko/distillm@d47e77ff `distillm/losses.py:4-12` (`forward_kl`; TAID re-uses it,
    SakanaAI/TAID@a0628922 `src/distil_losses/fkl.py:10-25`): per-token mean over
    `label != -100`, no temperature, combined as `(1 − kd_ratio)·CE + kd_ratio·KD` with
    kd_ratio = 1.0 in its scripts (`finetune.py:337`) → defaults kd_weight 1, ce_weight 0, T 1.
    Ours: the true KL (the authors log the cross-entropy −Σ p log q, i.e. + H(p); same gradient);
    the temperature with T² is Hinton's (B1 "with temperature"), T = 1 reproduces DistiLLM.
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(kd_weight, ce_weight)
        self.temperature = check_temperature(temperature)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        return forward_kl(student_logits, teacher, T) * (T * T)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"
