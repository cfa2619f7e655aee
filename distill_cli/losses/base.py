"""The objective contract shared by every loss.

An objective is an `nn.Module` called as `objective(student_logits, teacher_logits, targets, ctx)`
(or, for a `StepObjective`, given the models) and returning a dict of named scalar terms; `loss`
is the one back-propagated, every term is logged. Anything the objective must remember across steps (schedules, momenta) lives in
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
    """Base class: a logit objective. Subclasses set `needs_teacher` and implement `forward`.

    The teacher topology an objective needs is declared by its TYPE (the launcher reads it):
    `Objective` reads one frozen teacher's logits (stored or live); `PoolObjective` several
    teachers' stacked logits; `OnlineObjective` a teacher that trains alongside; `StepObjective`
    runs the models itself (feature taps, adversarial examples) and so its teacher runs live.
    """

    needs_teacher: bool = True
    # The task whose models this objective trains (tasks/): a classification loss refuses a
    # synthetic set, a dataset-distillation loss a classifier student.
    task_name: str = "classification"
    # True when the objective reads the frozen teacher's BatchNorm layers (SRe2L's statistics):
    # the teacher then keeps them instead of having them folded into its convolutions.
    keeps_teacher_batchnorm: bool = False
    # False for methods that index by the hard label (DKD's masks, PLD's label-first order):
    # they cannot train on mixup/CutMix batches, whose targets are label distributions.
    accepts_soft_targets: bool = True
    # False for label-free objectives (SSLD, TAID without CE): they never read `targets` of a
    # training batch, so they can train with `dataset.labels=false` and on unlabeled extra data.
    uses_labels: bool = True
    # True for methods whose point is privacy (Swing): `eval.mia=auto` then measures membership
    # inference of the final weights (distill_cli.evaluation.privacy) into the summary.
    measures_privacy: bool = False
    # Why the loss is NOT a mean of per-sample terms (relations within the batch, state updated
    # from the batch's values, noise drawn for the whole batch), or None when it is. Data-parallel
    # ranks each see a slice of the global batch, so such an objective is refused under torchrun
    # with this reason rather than computing something other than the 1-process loss.
    batch_coupling: str | None = None

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_terms(self, student: nn.Module, forward, teacher, batch, ctx: StepContext
                    ) -> dict[str, torch.Tensor]:
        """The terms of one training step. `forward` is the student's (possibly compiled)
        forward, `teacher` the run's topology (teachers/topology.py); the teacher's signal is
        read first, then the student runs."""
        t_logits = teacher.train_logits(batch) if self.needs_teacher else None
        return self(forward(batch.x).float(), t_logits, batch.y, ctx)

    def after_step(self, terms: dict[str, torch.Tensor], ctx: StepContext) -> None:
        """Called once after each optimizer step (never in evaluation). Default: nothing."""

    def bind(self, student: nn.Module, teacher, data) -> None:
        """Called once, before the optimizer is built, with the models on their device and the
        DataBundle. Objectives with trainable heads create them here (shapes from a dry
        forward), so the heads join the optimizer and the checkpoint. Default: nothing."""


class PoolObjective(Objective):
    """Distils from several frozen teachers (the top-level `teachers` list): `forward` gets
    `[K, B, C]` stacked teacher logits (a `[B, C]` tensor counts as K = 1)."""


class OnlineObjective(Objective):
    """Online distillation: the teacher is built fresh and TRAINS with the student (train mode,
    its own optimizer/scheduler, saved in checkpoints). `forward` gets the teacher's logits
    detached; `teacher_terms(t, s, y, ctx)` is the teacher's own loss on the student's detached
    logits, so neither network's loss moves the other and one backward trains both."""

    def teacher_terms(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      targets: torch.Tensor, ctx: StepContext | None = None
                      ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_terms(self, student, forward, teacher, batch, ctx):
        t_logits = teacher.train_logits(batch)
        s_logits = forward(batch.x).float()
        terms = self(s_logits, t_logits.detach(), batch.y, ctx)
        own = self.teacher_terms(t_logits, s_logits.detach(), batch.y, ctx)
        return {**terms, **{f"teacher_{k}": v for k, v in own.items()}}


class StepObjective(Objective):
    """Needs more than the two models' logits — feature taps, several forwards, adversarial
    examples (FitNet, AT, RKD, CRD, OFA, DisWOT, MTARD, adversarial CE): it runs the forward
    passes itself in `step_terms(student, teacher, batch, ctx)` (teacher: the frozen teacher, a
    pool's list for a `PoolObjective`, or None), runs its teacher(s) live and leaves the student
    in train mode."""

    def train_terms(self, student, forward, teacher, batch, ctx):
        models = teacher.models if isinstance(self, PoolObjective) else teacher.model
        return self.step_terms(student, models, batch, ctx)

    def step_terms(self, student: nn.Module, teacher, batch, ctx: StepContext
                   ) -> dict[str, torch.Tensor]:
        """The terms of one training step; `batch` has `index` (positions in the training
        split), `x` and `y`."""
        raise NotImplementedError


class CriticObjective(StepObjective):
    """Trains a CRITIC online next to a frozen teacher: a second network (the fake-score
    network of distribution-matching distillation, with an optional GAN head) with its own
    optimizer and scheduler (`loss.critic_optimizer` / `loss.critic_scheduler`, default the
    student's), its own gradient clip (`critic_grad_clip`) and update ratio. The runner builds
    it once with `build_critic(teacher)`; `step_terms(student, topology, batch, ctx)` gets the
    topology (teachers/topology.py `CriticTopology`: `.model` the frozen teacher, `.critic`) and
    returns the student's terms (`loss`) and the critic's (`critic_loss`, `critic_*`).

    Order (`critic_first`):
    - False (DMD2): both losses from one forward, one backward, both networks stepped together.
      Each loss sees the other network detached (the student's loss reads the critic through
      detached parameters; the critic trains on the student's detached samples), so this is
      the authors' generator-then-critic order: the critic learns from the samples the
      generator made before its update.
    - True (SiD): the objective calls `topology.update_critic(loss)` first; the student's terms
      then read the updated critic.
    A step where only the critic learns (a two-time-scale ratio) returns no `loss` (nor the
    student's other terms: the logs average each term over the steps that returned it): the
    student's optimizer then changes nothing."""

    critic_first: bool = False
    critic_grad_clip: float | None = None

    def build_critic(self, teacher: nn.Module) -> nn.Module:
        raise NotImplementedError

    def train_terms(self, student, forward, teacher, batch, ctx):
        return self.step_terms(student, teacher, batch, ctx)
