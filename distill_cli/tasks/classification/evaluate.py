"""Classifier evaluation: logits of a split in its fixed order, and their metrics."""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.evaluation.metrics import ClassificationMeter
from distill_cli.numerics import autocast


@torch.no_grad()
def predict(model: nn.Module, split, batch_size: int, device: torch.device,
            precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of `split` in its fixed order (eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for batch in split.eval_batches(batch_size):
        with autocast(device, precision):
            logits.append(model(batch.x).float())
        targets.append(batch.y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def score(logits: torch.Tensor, targets: torch.Tensor,
          reference: torch.Tensor | None = None) -> dict:
    """acc1/acc5/nll/ece, plus top-1 agreement with `reference` (the teacher's logits)."""
    meter = ClassificationMeter(logits.shape[1], logits.device)
    meter.update(logits, targets, reference)
    return meter.compute()
