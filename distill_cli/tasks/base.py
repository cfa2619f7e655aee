"""The task seam: what differs between kinds of distillation, and nothing else.

Everything around a task is shared by every family: composition and recipes, the teacher store
(a teacher is a `student` run of the same task with `teacher.train.loss`), checkpoints and exact
resume, SIGTERM, the run-dir contract, logging and W&B, sweeps and the report. The engine asks
the task for the training batches of an epoch, the model outputs of an evaluation split and the
metrics of those outputs; the teacher-output store asks it for the form of one stored row (`stored_signal`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # annotations only: reading a task's attributes needs no torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class StoredSignal:
    """What a run's frozen teacher serves its objective, stored or live alike: rows of
    `row_shape` per sample, made from the teacher's outputs by `transform` (None: the outputs
    themselves) before the output store's dtype rounds them. `identity` names the transform in
    the stored table's key (None with no transform: the keys of plain logit tables)."""

    row_shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    identity: dict | None = None


class Task:
    """Subclasses implement every method; `selection_metric` names the validation metric that
    selects `best` (higher is better) and `report_columns` the summary keys a report shows."""

    name: str = "task"
    #: the validation metric that selects `best.pt` (higher is better)
    selection_metric: str = "acc1"
    #: summary.json keys (and report columns such as `gain`) a `distill-report` table shows
    #: for this task, with their short headers
    report_columns: dict[str, str] = {}

    def build_model(self, node, key: str, data) -> nn.Module:
        """The model a config node describes, shaped for `data` (student and teacher alike)."""
        raise NotImplementedError

    def train_batches(self, data, batch_size: int, data_seed: int, epoch: int,
                      start_step: int, mix) -> Iterator[Any]:
        """The batches of training epoch `epoch` from `start_step`: a pure function of
        (data_seed, epoch, step), so resume and stored teacher outputs stay exact. Every batch
        has `index` (positions in the training split) for stored outputs."""
        raise NotImplementedError

    def predict(self, model: nn.Module, split, batch_size: int, device: torch.device,
                precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model outputs, targets) over an evaluation split in its fixed order."""
        raise NotImplementedError

    def score(self, outputs: torch.Tensor, targets: torch.Tensor,
              reference: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of `outputs` against `targets`, and against the teacher's `reference`
        outputs when given (agreement)."""
        raise NotImplementedError

    def stored_row_shape(self, data) -> tuple[int, ...]:
        """The shape of one sample's stored teacher output (the output store's row)."""
        raise NotImplementedError

    def stored_signal(self, objective, data, dtype: str) -> StoredSignal:
        """The teacher signal `objective` reads during training, as the output store would hold
        it in `dtype` (teacher.outputs_dtype); a live teacher serves the same rows. Default: the
        teacher's outputs themselves (`stored_row_shape`); a task may store a compact form (the
        LM task's packed top-k rows for an objective that reads them)."""
        return StoredSignal(tuple(self.stored_row_shape(data)))

    def steps_per_epoch(self, data, batch_size: int) -> int:
        """Optimizer steps in one training epoch (default: one pass over the training split)."""
        return data.train.num_batches(batch_size, train=True)

    def check_objective(self, objective: type) -> None:
        """Refuse an objective class made for another task (its `task_name`), before it is
        built (its options may only make sense under its own task)."""
        if objective.task_name != self.name:
            from distill_cli.errors import UserError
            raise UserError(f"loss={objective.__name__} is a {objective.task_name} "
                            f"objective, but the run's task is {self.name}", "loss",
                            f"Pick a {self.name} loss, or task={objective.task_name} with what "
                            "it needs (its recipes show how)")

    def stored_models(self) -> dict:
        """Models this task needs from the teacher store besides the run's teacher, as teacher
        nodes by name (the diffusion task's feature classifier for FD/KID). A node names the
        task that trains it in `train.task`. Default: none."""
        return {}

    def use_stored(self, name: str, model, info: dict) -> None:
        """Receives the frozen model `stored_models()[name]` describes, and where it came from."""

    def artifacts(self, model, run_dir, tag: str, data, logger, source: dict) -> None:
        """Files a run of this task leaves besides checkpoints, for the `start` model and the
        final `best` / `last` ones (a synthetic set's image grid and dataset file).
        `source`: the dataset's config node as a plain dict. Default: none."""
