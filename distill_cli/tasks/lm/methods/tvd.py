"""Total-variation distillation (DistiLLM's `tv_distance`)."""
from __future__ import annotations

import torch

from distill_cli.tasks.lm.divergences import total_variation
from distill_cli.tasks.lm.methods import TokenObjective


class TVD(TokenObjective):
    """Total variation: per counted token `ℓ = ½ Σ_v |p(v) − q(v)|` (symmetric, in [0, 1]).
    loss = kd_weight·mean_tok ℓ + ce_weight·mean_tok NLL.

    Source: jongwooko/distillm@d47e77ff `distillm/losses.py:55-64` (`tv_distance`, dispatched
    for `--type tvd` at `finetune.py:185-186`, kd_ratio 1.0 at `:337`): per-token mean over
    `label != -100`, no temperature. Ours: the same.
    """

    def divergence(self, student_logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return total_variation(student_logits, teacher)
