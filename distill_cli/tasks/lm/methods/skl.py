"""DistiLLM's skew forward KL (METHODS_FAMILIES.md B3)."""
from __future__ import annotations

import torch

from distill_cli.tasks.lm.divergences import skew_kl
from distill_cli.tasks.lm.methods import TokenObjective, check_alpha


class SKL(TokenObjective):
    """Skew KL (Ko et al., ICML 2024): per counted token

        ℓ = KL(p ‖ α·p + (1−α)·q)

    (α of the TEACHER in the mixture; the gradient reaches q inside the mixture; α = 0 is plain
    forward KL). loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: jongwooko/distillm@d47e77ff `distillm/losses.py:66-78` (`skewed_forward_kl`, `lam` =
    `--skew-alpha`, default 0.1 at `arguments.py:178`; dispatched at `finetune.py:179-180`;
    combined `(1 − kd_ratio)·CE + kd_ratio·KD`, kd_ratio 1.0, `finetune.py:337`): per-token mean
    over `label != -100`, no temperature. Ours: the true KL (the code logs −Σ p log m, i.e.
    + H(p); same gradient), the mixture as a log-sum-exp instead of `log(mixed_probs)`.
    """

    def __init__(self, alpha: float = 0.1, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__(kd_weight, ce_weight)
        self.alpha = check_alpha(alpha)

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return skew_kl(student_logits, teacher, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
