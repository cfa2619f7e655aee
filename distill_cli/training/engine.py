"""The training / evaluation loop: plain PyTorch, no framework, one step for every topology.

Per step: the task's batch (a pure function of seed, epoch, step) → the objective's terms (it
reads the teacher topology's signal and runs the student) → one backward of what the topology
says to differentiate → student optimizer/scheduler step, then the topology's own networks' →
objective.after_step. Where the teacher signal comes from (stored, live, a pool, an online
teacher that trains too) is the topology object's business (teachers/topology.py), what a batch
is and how outputs are scored the task's (tasks/). Loss terms accumulate on the device and are
read only every `log_every_n_steps` steps, so the hot loop has no host-device synchronisation.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distill_cli import keys
from distill_cli.runs import checkpoint
from distill_cli.losses.base import Objective, StepContext
from distill_cli.numerics import autocast, grad_scaler
from distill_cli.training.distributed import SINGLE, World
from distill_cli.training.settings import TrainerSettings


@dataclass
class TrainState:
    epoch: int = 0            # completed epochs
    epoch_step: int = 0       # optimizer steps already done inside epoch `epoch + 1`
    step: int = 0             # global optimizer steps
    best_score: float = -1.0   # the task's selection metric of `best` (val acc1 here)
    best_epoch: int = 0
    epoch_sums: dict = field(default_factory=dict)   # partial-epoch sums of train terms
    epoch_images: int = 0
    epoch_train_s: float = 0.0
    images_per_s: float = 0.0  # last finished epoch


class StopRequest:
    """Set by SIGTERM/SIGINT (or `trainer.stop_at_step`); the loop finishes the current step,
    writes `last.pt` and returns "interrupted"."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclass
class RunSinks:
    """Where a run's results go: its directory, the console, the external logger, and what
    every checkpoint carries besides the training state."""

    run_dir: Path
    reporter: Any
    logger: Any
    checkpoint_meta: dict


class Engine:
    def __init__(self, *, task, student: nn.Module, objective: Objective, teacher,
                 data, batches: Callable, optimizer, scheduler, settings: TrainerSettings,
                 device: torch.device, sinks: RunSinks, world: World = SINGLE):
        """`teacher` is the run's topology (teachers/topology.py); `batches(epoch, start_step)`
        yields the task's training batches (this rank's slice under torchrun)."""
        self.task, self.student, self.objective, self.teacher = task, student, objective, teacher
        self.data, self.batches = data, batches
        self.optimizer, self.scheduler = optimizer, scheduler
        self.settings, self.device, self.world = settings, device, world
        # the student as training runs it: DistributedDataParallel under torchrun (its gradients
        # averaged during backward); checkpoints always hold the unwrapped module's state
        self.trained = world.wrap(student, device)
        # torch.compile wraps the module for the forward only; state dicts stay un-prefixed
        self.forward = torch.compile(self.trained) if settings.compile else self.trained
        self.run_dir, self.reporter = Path(sinks.run_dir), sinks.reporter
        self.logger, self.meta = sinks.logger, sinks.checkpoint_meta
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.steps_per_epoch = data.train.num_batches(settings.batch_size, train=True)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.state = TrainState()
        self.stop = StopRequest()
        # trained outside the DDP-wrapped student (objective heads, an online teacher): averaged
        # over ranks after backward; listed once, not every step
        self.unwrapped_parameters = [*objective.parameters(), *teacher.trained_parameters()]
        # fp16 scales the loss so its gradients do not underflow; a pass-through otherwise
        self.scaler = grad_scaler(device, settings.precision)

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict:
        return {
            **self.meta,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            **self.teacher.state_dict(),
            "state": asdict(self.state),
            "rng": checkpoint.rng_state(),
            keys.WANDB_ID: self.logger.run_id,
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
        }

    def restore(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.objective.load_state_dict(ckpt["objective"])
        self.teacher.load_state_dict(ckpt)
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        state = dict(ckpt["state"])
        if "best_acc1" in state:   # checkpoints written before the task seam
            state["best_score"] = state.pop("best_acc1")
        self.state = TrainState(**state)
        checkpoint.set_rng_state(ckpt["rng"])

    def save(self, name: str) -> None:
        if self.world.is_main:   # one writer per run dir
            checkpoint.save(self.ckpt_dir / name, self.payload())

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, split, reference=None) -> dict:
        s = self.settings
        return self.task.score(*self.task.predict(model, split, s.eval_batch_size, self.device,
                                                  s.precision), reference)

    # ------------------------------------------------------------------ training
    def _train_step(self, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.settings.channels_last and batch.x.dim() == 4:
            batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
        with autocast(self.device, self.settings.precision):
            terms = self.objective.train_terms(self.trained, self.forward, self.teacher, batch,
                                               ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.zero_grad()
        self.scaler.scale(self.teacher.backward_loss(terms)).backward()
        self.world.average_gradients(self.unwrapped_parameters)
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)   # clip the true gradients
            self.teacher.unscale(self.scaler)
            nn.utils.clip_grad_norm_(self.student.parameters(), float(self.settings.grad_clip))
            self.teacher.clip_grad(float(self.settings.grad_clip))
        self.scaler.step(self.optimizer)
        self.scheduler.step()
        self.teacher.step(self.scaler)
        self.scaler.update()
        self.objective.after_step(terms, ctx)
        return terms

    def fit(self, on_epoch_end: Callable[[dict], None]) -> str:
        """Train until `trainer.epochs`; returns "finished" or "interrupted"."""
        s, cfg = self.state, self.settings
        log_every = max(cfg.log_every_n_steps, 1)
        ckpt_every = cfg.checkpoint_every_n_steps or 0
        stop_at = cfg.stop_at_step
        self.student.train()
        self.teacher.train()
        self.reporter.start(completed=s.step)
        with self.stop.installed():
            while s.epoch < cfg.epochs:
                epoch = s.epoch + 1
                sums = {k: torch.tensor(v, device=self.device) for k, v in s.epoch_sums.items()}
                window: dict[str, torch.Tensor] = {}
                window_n = 0
                t0 = time.perf_counter()
                self.teacher.begin_epoch(epoch)
                for batch in self.batches(epoch, s.epoch_step):
                    ctx = StepContext(epoch=epoch, step=s.step,
                                      steps_per_epoch=self.steps_per_epoch,
                                      total_steps=self.total_steps)
                    terms = self._train_step(batch, ctx)
                    for k, v in terms.items():
                        v = v.detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                        window[k] = window[k] + v if k in window else v
                    window_n += 1
                    s.step += 1
                    s.epoch_step += 1
                    s.epoch_images += len(batch.y) * self.world.size   # the global batch
                    if s.step % log_every == 0:   # the only host sync of the loop
                        values = {k: float(v) / window_n for k, v in window.items()}
                        values[keys.LR] = self.optimizer.param_groups[0]["lr"]
                        self.reporter.step(s.step, epoch, values)
                        self.logger.log({keys.join(keys.TRAIN, k): v for k, v in values.items()},
                                        s.step)
                        window, window_n = {}, 0
                    else:
                        self.reporter.step(s.step, epoch, None)
                    stopping = self.world.any(self.stop.signum is not None) or (
                        stop_at is not None and s.step >= stop_at)
                    if stopping or (ckpt_every and s.step % ckpt_every == 0):
                        s.epoch_sums = {k: float(v) for k, v in sums.items()}
                        s.epoch_train_s += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save("last.pt")
                    if stopping:
                        self.reporter.stop()
                        self.world.barrier()   # last.pt is on disk before any rank returns
                        return "interrupted"
                s.epoch_train_s += time.perf_counter() - t0
                row = self._end_epoch(epoch, sums)
                on_epoch_end(row)
        self.reporter.stop()
        self.world.barrier()   # best.pt / last.pt are on disk before any rank reads them
        return "finished"

    def _end_epoch(self, epoch: int, sums: dict) -> dict:
        s = self.state
        n = max(s.epoch_step, 1)
        row = {keys.EPOCH: epoch, keys.STEP: s.step,
               **{keys.join(keys.TRAIN, k): float(v) / n for k, v in sums.items()}}
        s.images_per_s = s.epoch_images / max(s.epoch_train_s, 1e-9)
        row[keys.TRAIN_IMAGES_PER_S] = s.images_per_s
        row[keys.LR] = self.optimizer.param_groups[0]["lr"]
        val = self.evaluate(self.student, self.data.val, self.teacher.reference("val"))
        row.update({keys.join(keys.VAL, k): v for k, v in val.items() if k != "n"})
        row.update(self.teacher.epoch_metrics())
        s.epoch, s.epoch_step, s.epoch_sums = epoch, 0, {}
        s.epoch_images, s.epoch_train_s = 0, 0.0
        metric = self.task.selection_metric
        if val[metric] > s.best_score:
            s.best_score, s.best_epoch = val[metric], epoch
            self.save("best.pt")
        row[keys.join(keys.BEST_VAL, metric)] = s.best_score
        self.save("last.pt")
        return row
