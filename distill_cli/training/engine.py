"""The training / evaluation loop: plain PyTorch, no framework, one step for every topology.

Per step: the task's batch (a pure function of seed, epoch, step) → the objective's terms (it
reads the teacher topology's signal and runs the student) → one backward of what the topology
says to differentiate → student optimizer/scheduler step, then the topology's own networks' →
objective.after_step. Where the teacher signal comes from (stored, live, a pool, an online
teacher that trains too) is the topology object's business (teachers/topology.py), what a batch
is and how outputs are scored the task's (tasks/). Loss terms accumulate on the device and are
read only every `log_every_n_steps` steps, so the hot loop has no host-device synchronisation.

Non-finite numbers (`trainer.on_nonfinite`): under `stop` (the default) each step's loss is
checked ON the device (`NonFiniteWatch`) and read where the loop syncs anyway — a log step,
before any checkpoint is written, at the end of an epoch (with the weights and the validation
outputs) — so a diverged run ends with `Diverged` naming its first non-finite step, and never
writes a non-finite checkpoint. Under `skip` a step whose loss or gradients are non-finite
changes nothing (one host sync per step, the price of deciding before the update). Under
torchrun every decision is reduced over the ranks first, so they all stop, or skip, at the same
step.
"""
from __future__ import annotations

import contextlib
import json
import math
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
    # the task's selection metric of `best` (val acc1; an LM's -NLL is negative): none yet = -inf
    best_score: float = float("-inf")
    best_epoch: int = 0
    epoch_sums: dict = field(default_factory=dict)   # partial-epoch sums of train terms
    # how many steps returned each term (a critic objective's generator terms come every
    # `ratio`-th step only; absent = every non-skipped step, as before this field existed)
    epoch_counts: dict = field(default_factory=dict)
    epoch_images: int = 0
    epoch_train_s: float = 0.0
    images_per_s: float = 0.0  # last finished epoch
    skipped_steps: int = 0     # steps trainer.on_nonfinite=skip left out, in all
    epoch_skipped: int = 0     # ... inside epoch `epoch + 1`
    # the metrics.jsonl line of epoch `epoch`: last.pt is written before that line is
    # appended, so a run killed in between restores the line from the checkpoint
    epoch_row: str = ""


class Diverged(Exception):
    """The loss (or the weights) became non-finite at global step `step` (1-based) of epoch
    `epoch`, under trainer.on_nonfinite=stop, or every step of an epoch was skipped."""

    def __init__(self, step: int, epoch: int, what: str):
        self.step, self.epoch, self.what = step, epoch, what
        super().__init__(f"{what} at step {step} (epoch {epoch})")


#: a step number no run reaches: "nothing non-finite" in a MIN reduction over ranks
_NEVER = 2 ** 60   # (2 * _NEVER + 1 must fit an int64)


class NonFiniteWatch:
    """The first step whose loss was non-finite, kept on the device: recording it costs no
    host-device sync; `first` reads it (one sync, one MIN over the ranks under torchrun)."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), _NEVER, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.step = torch.where(bad, torch.clamp(self.step, max=step), self.step)

    def first(self, world: World, weights_bad_at: int | None = None) -> tuple[int, bool] | None:
        """(the earliest non-finite step over all ranks, whether it is the loss's — else the
        weights' at `weights_bad_at`), or None when everything is finite."""
        # one reduction for both: 2 * step + 1 marks the weights' (the loss's wins a tie)
        code = min(2 * int(self.step),
                   2 * _NEVER if weights_bad_at is None else 2 * weights_bad_at + 1)
        code = world.min(code)
        return None if code >= 2 * _NEVER else (code // 2, code % 2 == 0)


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
        self.steps_per_epoch = task.steps_per_epoch(data, settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.state = TrainState()
        self.stop = StopRequest()
        # trained outside the DDP-wrapped student (objective heads, an online teacher): averaged
        # over ranks after backward; listed once, not every step
        self.unwrapped_parameters = [*objective.parameters(), *teacher.trained_parameters()]
        # fp16 scales the loss so its gradients do not underflow; a pass-through otherwise
        self.scaler = grad_scaler(device, settings.precision)
        self.skip_nonfinite = settings.on_nonfinite == "skip"
        self.watch = NonFiniteWatch(device)
        # what a training forward changes besides the parameters: normalisation statistics
        # (a skipped step puts them back; other buffers, e.g. a memory bank, change in
        # `after_step`, which a skipped step never reaches)
        self.step_buffers = [b for m in (*student.modules(), *objective.modules())
                             if isinstance(m, nn.modules.batchnorm._NormBase)
                             for b in m.buffers(recurse=False)]

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
        """The student's scores on `split`. An objective whose authors evaluate a transform of
        the outputs (MIX-KD: each row divided by its std) supplies `eval_logits`; NLL and ECE
        are then of those outputs (`objective.eval_view`, recorded in the summary)."""
        s = self.settings
        outputs, targets = self.task.predict(model, split, s.eval_batch_size, self.device,
                                             s.precision)
        transform = getattr(self.objective, "eval_logits", None)
        return self.task.score(transform(outputs) if transform else outputs, targets, reference)

    # ------------------------------------------------------------------ training
    def _train_step(self, batch, ctx: StepContext) -> dict[str, torch.Tensor] | None:
        """One optimizer step; its terms, or None when trainer.on_nonfinite=skip skipped it."""
        if self.settings.channels_last and batch.x.dim() == 4:
            batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
        saved = [b.clone() for b in self.step_buffers] if self.skip_nonfinite else None
        with autocast(self.device, self.settings.precision):
            terms = self.objective.train_terms(self.trained, self.forward, self.teacher, batch,
                                               ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.zero_grad()
        loss = self.teacher.backward_loss(terms)
        if loss.requires_grad:   # no graph: a step where only a critic learned (its own step)
            self.scaler.scale(loss).backward()
        self.world.average_gradients(self.unwrapped_parameters)
        if self.skip_nonfinite:
            # every rank ran its backward (DDP needs them all); all skip if any saw nan/inf.
            # Skipped = nothing trained changes: no optimizer, scheduler or objective step,
            # normalisation statistics put back; the batch counts as seen (`step` advances)
            if self.world.any(not self._step_finite(loss)):
                self.optimizer.zero_grad(set_to_none=True)
                self.teacher.zero_grad()
                for buffer, before in zip(self.step_buffers, saved):
                    buffer.copy_(before)
                return None
        else:
            self.watch.record(loss, ctx.step + 1)
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

    def _step_finite(self, loss: torch.Tensor) -> bool:
        """The loss, and (but under fp16, whose scaler skips overflowed gradients itself) the
        gradients, are finite: one host sync."""
        if not bool(torch.isfinite(loss.detach()).all()):
            return False
        if self.scaler.is_enabled():
            return True
        grads = [p.grad for p in (*self.student.parameters(), *self.unwrapped_parameters)
                 if p.grad is not None]
        return not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads)))

    def _weights_finite(self) -> bool:
        """Every trained parameter and the student's float buffers: one host sync."""
        tensors = [*self.student.parameters(), *self.unwrapped_parameters,
                   *(b for b in self.student.buffers() if b.is_floating_point())]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def _check_finite(self, epoch: int, weights: bool = False,
                      outputs_finite: bool = True) -> None:
        """Raise `Diverged` when a step's loss — or, with `weights`, a weight or (`outputs_finite`
        False) a validation output — is non-finite on any rank; call it at the same steps on
        every rank (a collective under torchrun)."""
        s = self.state
        bad = weights and not (outputs_finite and self._weights_finite())
        found = self.watch.first(self.world, s.step if bad else None)
        if found is not None:
            step, of_loss = found
            raise Diverged(step, epoch, "the loss became non-finite (nan/inf)" if of_loss
                           else "the weights or the model's validation outputs were found "
                           "non-finite (nan/inf)")

    def fit(self, on_epoch_end: Callable[[dict], None]) -> str:
        """Train until `trainer.epochs`; returns "finished" or "interrupted", raises
        `Diverged` (trainer.on_nonfinite)."""
        self.student.train()
        self.teacher.train()
        self.reporter.start(completed=self.state.step)
        try:
            with self.stop.installed():
                return self._loop(on_epoch_end)
        except Diverged:
            self.reporter.stop()
            raise

    def _loop(self, on_epoch_end: Callable[[dict], None]) -> str:
        s, cfg = self.state, self.settings
        log_every = max(cfg.log_every_n_steps, 1)
        ckpt_every = cfg.checkpoint_every_n_steps or 0
        stop_at = cfg.stop_at_step
        while s.epoch < cfg.epochs:
            epoch = s.epoch + 1
            sums = {k: torch.tensor(v, device=self.device) for k, v in s.epoch_sums.items()}
            counts = {k: int(s.epoch_counts.get(k, s.epoch_step - s.epoch_skipped))
                      for k in sums}
            window_counts: dict[str, int] = {}
            window: dict[str, torch.Tensor] = {}
            window_n = 0
            t0 = time.perf_counter()
            self.teacher.begin_epoch(epoch)
            for batch in self.batches(epoch, s.epoch_step):
                ctx = StepContext(epoch=epoch, step=s.step,
                                  steps_per_epoch=self.steps_per_epoch,
                                  total_steps=self.total_steps)
                terms = self._train_step(batch, ctx)
                if terms is None:   # skipped (trainer.on_nonfinite=skip)
                    s.skipped_steps += 1
                    s.epoch_skipped += 1
                else:
                    for k, v in terms.items():
                        v = v.detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                        counts[k] = counts.get(k, 0) + 1
                        window_counts[k] = window_counts.get(k, 0) + 1
                        window[k] = window[k] + v if k in window else v
                    window_n += 1
                s.step += 1
                s.epoch_step += 1
                s.epoch_images += len(batch.y) * self.world.size   # the global batch
                if s.step % log_every == 0:   # the only host sync of the loop
                    self._check_finite(epoch)
                    values = {k: float(v) / window_counts[k] for k, v in window.items()}
                    values[keys.LR] = self.optimizer.param_groups[0]["lr"]
                    self.reporter.step(s.step, epoch, values)
                    self.logger.log({keys.join(keys.TRAIN, k): v for k, v in values.items()},
                                    s.step)
                    window, window_n, window_counts = {}, 0, {}
                else:
                    self.reporter.step(s.step, epoch, None)
                stopping = self.world.any(self.stop.signum is not None) or (
                    stop_at is not None and s.step >= stop_at)
                if stopping or (ckpt_every and s.step % ckpt_every == 0):
                    self._check_finite(epoch)   # never a non-finite last.pt
                    s.epoch_sums = {k: float(v) for k, v in sums.items()}
                    s.epoch_counts = dict(counts)
                    s.epoch_train_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save("last.pt")
                if stopping:
                    self.reporter.stop()
                    self.world.barrier()   # last.pt is on disk before any rank returns
                    return "interrupted"
            s.epoch_train_s += time.perf_counter() - t0
            row = self._end_epoch(epoch, sums, counts)
            on_epoch_end(row)
        self.reporter.stop()
        self.world.barrier()   # best.pt / last.pt are on disk before any rank reads them
        return "finished"

    def _end_epoch(self, epoch: int, sums: dict, counts: dict) -> dict:
        s = self.state
        if s.epoch_skipped and s.epoch_skipped == s.epoch_step:   # the same on every rank
            raise Diverged(s.step, epoch, f"every step of epoch {epoch} had a non-finite loss "
                           "or gradient (all skipped)")
        n = max(s.epoch_step - s.epoch_skipped, 1)
        row = {keys.EPOCH: epoch, keys.STEP: s.step,
               **{keys.join(keys.TRAIN, k): float(v) / max(counts.get(k, n), 1)
                  for k, v in sums.items()}}
        if self.skip_nonfinite:
            row[keys.TRAIN_SKIPPED_STEPS] = s.epoch_skipped
        s.images_per_s = s.epoch_images / max(s.epoch_train_s, 1e-9)
        row[keys.TRAIN_IMAGES_PER_S] = s.images_per_s
        row[keys.LR] = self.optimizer.param_groups[0]["lr"]
        val = self.evaluate(self.student, self.data.val, self.teacher.reference("val"))
        # before best.pt / last.pt can take them: finite weights that compute non-finite
        # outputs (huge weights after an update) are as diverged as nan weights
        self._check_finite(epoch, weights=True, outputs_finite=all(
            math.isfinite(v) for v in val.values() if isinstance(v, float)))
        row.update({keys.join(keys.VAL, k): v for k, v in val.items() if k != "n"})
        row.update(self.teacher.epoch_metrics())
        s.epoch, s.epoch_step, s.epoch_sums, s.epoch_skipped = epoch, 0, {}, 0
        s.epoch_counts = {}
        s.epoch_images, s.epoch_train_s = 0, 0.0
        metric = self.task.selection_metric
        if val[metric] > s.best_score:
            s.best_score, s.best_epoch = val[metric], epoch
            self.save("best.pt")
        row[keys.join(keys.BEST_VAL, metric)] = s.best_score
        s.epoch_row = json.dumps(row, sort_keys=True)
        self.save("last.pt")
        return row
