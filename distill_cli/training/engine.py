"""The training / evaluation loop: plain PyTorch, no framework.

Per step: batch (a pure function of seed, epoch, step) → teacher logits under inference
mode → student forward → objective terms → backward → optimizer and scheduler step →
objective.after_step. Two variants: several frozen teachers (`teachers`, stacked `[K, B, C]`
logits), and an online teacher (`objective.online_teacher`: it trains alongside the student with
its own optimizer/scheduler, in train mode, and is saved in checkpoints). Loss terms accumulate on the device and are read only every
`log_every_n_steps` steps, so the hot loop has no host-device synchronisation.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from distill_cli.runs import checkpoint
from distill_cli.data.mixing import MixSpec, training_batches
from distill_cli.losses.base import Objective, StepContext
from distill_cli.evaluation.metrics import ClassificationMeter
from distill_cli.numerics import autocast, quantise


@dataclass
class TrainState:
    epoch: int = 0            # completed epochs
    epoch_step: int = 0       # optimizer steps already done inside epoch `epoch + 1`
    step: int = 0             # global optimizer steps
    best_acc1: float = -1.0
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


def teacher_logits(teacher: nn.Module, x: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    with torch.inference_mode():
        out = teacher(x)
    # inference tensors cannot be saved for backward; a [B, C] copy is negligible. Quantised to
    # the output store's dtype, so a live run and a stored-outputs run compute the same thing.
    return quantise(out.float(), dtype).clone()


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


class Engine:
    def __init__(self, *, student: nn.Module, teacher: nn.Module | None, objective: Objective,
                 data, optimizer, scheduler, trainer_cfg, data_seed: int, device: torch.device,
                 run_dir: Path, reporter, logger, checkpoint_meta: dict, outputs=None,
                 outputs_dtype: str = "float32", mix: MixSpec | None = None,
                 teachers: list[nn.Module] | None = None, teacher_optimizer=None,
                 teacher_scheduler=None):
        self.student, self.teacher, self.objective = student, teacher, objective
        # several frozen teachers (multi-teacher objectives); `teacher` is then None
        self.teachers = list(teachers or [])
        # an online teacher trains with the student: its optimizer/scheduler step every step
        self.online = teacher is not None and objective.online_teacher
        if self.online and (teacher_optimizer is None or teacher_scheduler is None):
            raise ValueError("an online teacher needs teacher_optimizer and teacher_scheduler")
        self.teacher_optimizer, self.teacher_scheduler = teacher_optimizer, teacher_scheduler
        self.data, self.optimizer, self.scheduler = data, optimizer, scheduler
        self.cfg, self.data_seed, self.device = trainer_cfg, data_seed, device
        # stored teacher logits (TeacherOutputs) or None for a live teacher forward
        self.outputs, self.outputs_dtype = outputs, outputs_dtype
        self.mix = mix or MixSpec()
        self.uses_teacher = (teacher is not None or bool(self.teachers)) and objective.needs_teacher
        self.channels_last = bool(trainer_cfg.get("channels_last", False))
        # torch.compile wraps the module for the forward only; state dicts stay un-prefixed
        self.forward = torch.compile(student) if trainer_cfg.get("compile", False) else student
        self.run_dir, self.reporter, self.logger = Path(run_dir), reporter, logger
        self.meta = checkpoint_meta
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.batch_size = int(trainer_cfg.batch_size)
        self.steps_per_epoch = data.train.num_batches(self.batch_size, train=True)
        self.total_steps = self.steps_per_epoch * int(trainer_cfg.epochs)
        self.state = TrainState()
        self.stop = StopRequest()
        self._val_teacher_logits = None

    # ------------------------------------------------------------------ checkpoints
    def payload(self) -> dict:
        s = self.state
        online = {"teacher_model": self.teacher.state_dict(),
                  "teacher_optimizer": self.teacher_optimizer.state_dict(),
                  "teacher_scheduler": self.teacher_scheduler.state_dict()} if self.online else {}
        return {
            **self.meta,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            **online,
            "state": {k: v for k, v in asdict(s).items()},
            "rng": checkpoint.rng_state(),
            "wandb_id": self.logger.run_id,
        }

    def restore(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.objective.load_state_dict(ckpt["objective"])
        if self.online:
            self.teacher.load_state_dict(ckpt["teacher_model"])
            self.teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
            self.teacher_scheduler.load_state_dict(ckpt["teacher_scheduler"])
        self.state = TrainState(**ckpt["state"])
        checkpoint.set_rng_state(ckpt["rng"])

    def save(self, name: str) -> None:
        checkpoint.save(self.ckpt_dir / name, self.payload())

    # ------------------------------------------------------------------ evaluation
    def val_reference(self):
        """Teacher logits on val, computed once: val is never augmented, so they are fixed —
        except for an online teacher, which changes every step (recomputed per call)."""
        if self.teacher is not None and (self._val_teacher_logits is None or self.online):
            self._val_teacher_logits = self.teacher_eval_logits("val")
        return self._val_teacher_logits

    def teacher_eval_logits(self, split: str, member: int | None = None) -> torch.Tensor:
        """The teacher's (or pool member `member`'s) logits on an evaluation split."""
        outputs = self.outputs
        if outputs is not None and member is not None:
            outputs = outputs.members[member]
        if outputs is not None:
            return outputs.eval_table(split, int(self.cfg.eval_batch_size))
        model = self.teacher if member is None else self.teachers[member]
        return self.predict(model, getattr(self.data, split))[0]

    def predict(self, model, split) -> tuple[torch.Tensor, torch.Tensor]:
        return predict(model, split, int(self.cfg.eval_batch_size), self.device,
                       self.cfg.precision)

    def evaluate(self, model, split, reference=None) -> dict:
        return score(*self.predict(model, split), reference)

    # ------------------------------------------------------------------ training
    def _terms(self, batch, ctx: StepContext, table) -> tuple[dict, dict | None]:
        """(student objective terms, online teacher's terms or None) of one step."""
        if self.objective.owns_step:   # feature / adversarial methods run the models themselves
            return self.objective.step_terms(self.student, self.teachers or self.teacher,
                                             batch, ctx), None
        # a teacher attached to a CE run (a sweep's baseline) is only evaluated, never run here
        t_logits = None
        if table is not None:   # a pool's table is [N, K, C]: rows → [K, B, C]
            t_logits = table.index_select(0, batch.index)
            if self.teachers:
                t_logits = t_logits.transpose(0, 1)
        elif self.online:   # train mode, with gradient: the teacher learns too
            t_logits = self.teacher(batch.x).float()
        elif self.teachers:
            t_logits = torch.stack([teacher_logits(t, batch.x, self.outputs_dtype)
                                    for t in self.teachers])
        elif self.uses_teacher:
            t_logits = teacher_logits(self.teacher, batch.x, self.outputs_dtype)
        s_logits = self.forward(batch.x).float()
        if not self.online:
            return self.objective(s_logits, t_logits, batch.y, ctx), None
        return (self.objective(s_logits, t_logits.detach(), batch.y, ctx),
                self.objective.teacher_terms(t_logits, s_logits.detach(), batch.y, ctx))

    def _train_step(self, batch, ctx: StepContext, table) -> dict[str, torch.Tensor]:
        if self.channels_last and batch.x.dim() == 4:
            batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
        with autocast(self.device, self.cfg.precision):
            terms, teacher_terms = self._terms(batch, ctx, table)
        self.optimizer.zero_grad(set_to_none=True)
        if self.online:
            # each loss only reaches its own network (the other side is detached): one backward
            self.teacher_optimizer.zero_grad(set_to_none=True)
            (terms["loss"] + teacher_terms["loss"]).backward()
            terms = {**terms, **{f"teacher_{k}": v for k, v in teacher_terms.items()}}
        else:
            terms["loss"].backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), float(self.cfg.grad_clip))
            if self.online:
                nn.utils.clip_grad_norm_(self.teacher.parameters(), float(self.cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        if self.online:
            self.teacher_optimizer.step()
            self.teacher_scheduler.step()
        self.objective.after_step(terms, ctx)
        return terms

    def fit(self, on_epoch_end: Callable[[dict], None]) -> str:
        """Train until `trainer.epochs`; returns "finished" or "interrupted"."""
        s, cfg = self.state, self.cfg
        log_every = max(int(cfg.log_every_n_steps), 1)
        ckpt_every = int(cfg.checkpoint_every_n_steps or 0)
        stop_at = cfg.stop_at_step
        self.student.train()
        if self.online:
            self.teacher.train()
        self.reporter.start(completed=s.step)
        with self.stop.installed():
            while s.epoch < int(cfg.epochs):
                epoch = s.epoch + 1
                sums = {k: torch.tensor(v, device=self.device) for k, v in s.epoch_sums.items()}
                window: dict[str, torch.Tensor] = {}
                window_n = 0
                t0 = time.perf_counter()
                table = (self.outputs.train_table(epoch)
                         if self.outputs is not None and self.uses_teacher else None)
                batches = training_batches(self.data.train, self.batch_size, self.data_seed,
                                           epoch, s.epoch_step, self.mix,
                                           self.data.num_classes)
                for batch in batches:
                    ctx = StepContext(epoch=epoch, step=s.step,
                                      steps_per_epoch=self.steps_per_epoch,
                                      total_steps=self.total_steps)
                    terms = self._train_step(batch, ctx, table)
                    for k, v in terms.items():
                        v = v.detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                        window[k] = window[k] + v if k in window else v
                    window_n += 1
                    s.step += 1
                    s.epoch_step += 1
                    s.epoch_images += len(batch.y)
                    if s.step % log_every == 0:   # the only host sync of the loop
                        values = {k: float(v) / window_n for k, v in window.items()}
                        values["lr"] = self.optimizer.param_groups[0]["lr"]
                        self.reporter.step(s.step, epoch, values)
                        self.logger.log({f"train/{k}": v for k, v in values.items()}, s.step)
                        window, window_n = {}, 0
                    else:
                        self.reporter.step(s.step, epoch, None)
                    stopping = self.stop.signum is not None or (
                        stop_at is not None and s.step >= int(stop_at))
                    if stopping or (ckpt_every and s.step % ckpt_every == 0):
                        s.epoch_sums = {k: float(v) for k, v in sums.items()}
                        s.epoch_train_s += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save("last.pt")
                    if stopping:
                        self.reporter.stop()
                        return "interrupted"
                s.epoch_train_s += time.perf_counter() - t0
                row = self._end_epoch(epoch, sums)
                on_epoch_end(row)
        self.reporter.stop()
        return "finished"

    def _end_epoch(self, epoch: int, sums: dict) -> dict:
        s = self.state
        n = max(s.epoch_step, 1)
        row = {"epoch": epoch, "step": s.step,
               **{f"train/{k}": float(v) / n for k, v in sums.items()}}
        s.images_per_s = s.epoch_images / max(s.epoch_train_s, 1e-9)
        row["train/images_per_s"] = s.images_per_s
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        reference = self.val_reference()
        val = self.evaluate(self.student, self.data.val, reference)
        row.update({f"val/{k}": v for k, v in val.items() if k != "n"})
        if self.online:   # the online teacher is a trained result too: track it every epoch
            t_val = score(reference, self.data.val.targets)
            row.update({f"val/teacher_{k}": v for k, v in t_val.items() if k != "n"})
        s.epoch, s.epoch_step, s.epoch_sums = epoch, 0, {}
        s.epoch_images, s.epoch_train_s = 0, 0.0
        if val["acc1"] > s.best_acc1:
            s.best_acc1, s.best_epoch = val["acc1"], epoch
            self.save("best.pt")
        row["best/val/acc1"] = s.best_acc1
        self.save("last.pt")
        return row
