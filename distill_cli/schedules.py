"""Learning-rate schedules, stepped once per optimizer step.

Each factory is bound by Hydra (`_partial_: true`) and called as
`factory(optimizer, steps_per_epoch=..., epochs=...)`. They return a `LambdaLR` built from a
closure, so the scheduler's `state_dict()` holds only plain numbers (weights_only-loadable)
and a resumed run recomputes the factor from the step count alone.
"""
from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _with_warmup(factor, warmup_steps: int):
    def lr_lambda(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            # linear ramp that reaches the base lr at the end of warm-up (never exactly 0)
            return (step + 1) / warmup_steps
        return factor(step)
    return lr_lambda


def multistep(optimizer: Optimizer, steps_per_epoch: int, epochs: int,
              milestones=(150, 180, 210), gamma: float = 0.1, warmup_epochs: int = 0) -> LambdaLR:
    """lr × gamma^k after k milestones (in epochs), as in the CIFAR-100 KD protocol."""
    bounds = sorted(int(m) * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        return gamma ** bisect.bisect_right(bounds, step)
    return LambdaLR(optimizer, _with_warmup(factor, warmup_epochs * steps_per_epoch))


def cosine(optimizer: Optimizer, steps_per_epoch: int, epochs: int,
           warmup_epochs: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then half a cosine from 1 to `min_lr_ratio` over the remaining steps."""
    warmup = warmup_epochs * steps_per_epoch
    total = max(epochs * steps_per_epoch - warmup, 1)

    def factor(step: int) -> float:
        progress = min(max(step - warmup, 0) / total, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return LambdaLR(optimizer, _with_warmup(factor, warmup))


def constant(optimizer: Optimizer, steps_per_epoch: int, epochs: int,
             warmup_epochs: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, _with_warmup(lambda step: 1.0, warmup_epochs * steps_per_epoch))
