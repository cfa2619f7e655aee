"""The objective contract shared by every loss.

An objective is an `nn.Module` called as `objective(student_logits, teacher_logits, targets, ctx)`
and returning a dict of named scalar terms; `loss` is the one back-propagated, every term is
logged. Anything the objective must remember across steps (schedules, momenta) lives in
buffers, so it is saved in checkpoints through `state_dict()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepContext:
    """Where training is. `epoch` counts from 1 (DKD's warm-up convention)."""

    epoch: int
    step: int  # global optimizer step, 0-based, of the step being computed
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        return self.total_steps // max(self.steps_per_epoch, 1)


class Objective(nn.Module):
    """Base class: subclasses set `needs_teacher` and implement `forward`."""

    needs_teacher: bool = True
    # True for methods whose teacher must run live every step (online teachers that train,
    # feature-based methods): their teacher logits are never served from the output store.
    live_teacher_only: bool = False
    # False for methods that index by the hard label (DKD's masks, PLD's label-first order):
    # they cannot train on mixup/CutMix batches, whose targets are label distributions.
    accepts_soft_targets: bool = True
    # True for online distillation (BD-KD): the teacher is built fresh and TRAINS with the student
    # (train mode, its own optimizer/scheduler, saved in checkpoints). The engine then passes the
    # student objective DETACHED teacher logits and calls `teacher_terms(t, s, y, ctx)` for the
    # teacher's own loss. Such objectives also set `live_teacher_only`.
    online_teacher: bool = False
    # True for objectives distilling from several teachers (the top-level `teachers` list): they
    # get `[K, B, C]` stacked teacher logits (a `[B, C]` tensor counts as K = 1).
    multiple_teachers: bool = False
    # False for label-free objectives (SSLD, TAID without CE): they never read `targets` of a
    # training batch, so they can train with `dataset.labels=false` and on unlabeled extra data.
    uses_labels: bool = True
    # True for methods whose point is privacy (Swing): `eval.mia=auto` then measures membership
    # inference of the final weights (distill_cli.evaluation.privacy) into the summary.
    measures_privacy: bool = False
    # True for methods that need more than the two models' logits — feature taps, several
    # forwards, adversarial examples (FitNet, AT, RKD, CRD, OFA, DisWOT, MTARD, adversarial CE).
    # The engine then leaves the forward passes to `step_terms(student, teacher, batch, ctx)`
    # (teacher: the frozen teacher, the pool's list with `multiple_teachers`, or None). Such
    # objectives run their teacher(s) live and keep the student in train mode on return.
    owns_step: bool = False

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, terms: dict[str, torch.Tensor], ctx: StepContext) -> None:
        """Called once after each optimizer step (never in evaluation). Default: nothing."""

    def bind(self, student: nn.Module, teacher, data) -> None:
        """Called once, before the optimizer is built, with the models on their device and the
        DataBundle. Objectives with trainable heads create them here (shapes from a dry
        forward), so the heads join the optimizer and the checkpoint. Default: nothing."""

    def step_terms(self, student: nn.Module, teacher, batch, ctx: StepContext
                   ) -> dict[str, torch.Tensor]:
        """The terms of one training step (`owns_step` objectives only); `batch` has
        `index` (positions in the training split), `x` and `y`."""
        raise NotImplementedError(f"{type(self).__name__} does not own its step")
