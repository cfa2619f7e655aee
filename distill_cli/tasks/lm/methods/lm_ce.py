"""Plain next-token cross-entropy: the no-teacher baseline of LM distillation."""
from __future__ import annotations

import torch

from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float
from distill_cli.tasks.lm.divergences import counted, token_mean, token_nll
from distill_cli.tasks.lm.methods import check_student


class LMCE(Objective):
    """Next-token cross-entropy `mean_tok −log q(y_t)` over the counted tokens (`y != -100`):
    the student trained on the text alone (also the LM teacher's own objective).

    Source: the standard causal-LM loss — `nn.CrossEntropyLoss(ignore_index=-100)` on flattened
    logits (jongwooko/distillm@d47e77ff `finetune.py:162-168`, `pt_loss`), i.e. the per-token mean
    over non-ignored positions. Ours: the same, except that a batch with no counted token gives
    0 (torch gives NaN). Terms: `loss`, `ce`.
    """

    task_name = "lm"
    needs_teacher = False
    accepts_soft_targets = False
    accepts_topk = False

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_student(student_logits, targets)
        mask = counted(targets)
        s = torch.where(mask.unsqueeze(-1), as_float(student_logits), 0.0)
        ce = token_mean(token_nll(s, targets), mask)
        return {"loss": ce, "ce": ce.detach()}
