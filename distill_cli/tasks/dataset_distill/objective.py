"""The base of every dataset-distillation objective: it runs the networks itself on the
synthetic set (the student) and a real class-balanced batch, and returns the matching loss
that is back-propagated into the set's images."""
from __future__ import annotations

from distill_cli.losses.base import StepObjective


class SetObjective(StepObjective):
    task_name = "dataset_distill"
    needs_teacher = False
    accepts_soft_targets = False
    batch_coupling = "it matches statistics of whole class batches"
