"""DistiLLM's skew reverse KL (METHODS_FAMILIES.md B3)."""
from __future__ import annotations

import torch

from distill_cli.tasks.lm.divergences import skew_reverse_kl
from distill_cli.tasks.lm.methods import TokenObjective, check_alpha


class SRKL(TokenObjective):
    """Skew reverse KL (Ko et al., ICML 2024): per counted token

        ℓ = KL(q ‖ α·q + (1−α)·p) = Σ_v q [log q − log(α·q + (1−α)·p)]

    (α of the STUDENT in the mixture; α = 0 is plain reverse KL). loss = kd_weight·mean_tok ℓ +
    ce_weight·mean_tok NLL.

    Source: jongwooko/distillm@d47e77ff `distillm/losses.py:80-95` (`skewed_reverse_kl`:
    `mixed = (1−lam)·teacher + lam·student`, `lam` = `--skew-alpha` 0.1, `arguments.py:178`;
    `finetune.py:181-182`, kd_ratio 1.0 at `:337`): per-token mean over `label != -100`, no
    temperature. Ours: the same value, the mixture as a log-sum-exp.
    """

    def __init__(self, alpha: float = 0.1, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(kd_weight, ce_weight)
        self.alpha = check_alpha(alpha)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return skew_reverse_kl(student_logits, teacher, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
