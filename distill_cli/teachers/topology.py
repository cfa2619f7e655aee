"""Teacher topologies: where a run's teacher signal comes from, as objects.

`choose_topology` (training/teacher_setup.py) picks one from the objective's type and the
teacher setup; the engine calls the hooks below and has no branch per topology:

    begin_epoch(epoch)        before an epoch's first step (a stored table is loaded here)
    train_logits(batch)       the signal an objective's step reads for `batch`
    backward_loss(terms)      what one backward pass differentiates (the online teacher adds
                              its own loss: each side sees the other detached)
    zero_grad / unscale / clip_grad / step / train / trained_parameters
                              the networks it trains, if any
    state_dict / load_state_dict           their checkpoint entries (exact resume)
    reference(split)          the teacher's outputs on an evaluation split (agreement)
    references(split)         every teacher's outputs, by summary prefix (teacher/test/*)
    epoch_metrics()           validation metrics tracked every epoch (a teacher that learns)
    summary()                 summary.json fields: stored or live, output-store hit rate

A new family adds a topology here without touching the engine (`CriticTopology`: a frozen teacher
and an online critic with its own optimizer, for distribution-matching distillation).
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli import keys
from distill_cli.numerics import quantise


def frozen_logits(teacher: nn.Module, x: torch.Tensor, dtype: str = "float32", transform=None
                  ) -> torch.Tensor:
    """A frozen teacher's forward, made into the stored form (`transform`, the task's
    `stored_signal`: e.g. packed top-k rows) and quantised to the output store's dtype, so that
    a live run and a stored-outputs run compute the same thing."""
    with torch.inference_mode():
        out = teacher(x)
        if transform is not None:
            # outside the step's autocast, as the store computes it (teachers/outputs.py)
            with torch.autocast(x.device.type, enabled=False):
                out = transform(out.float())
    # inference tensors cannot be saved for backward; a [B, C] copy is negligible
    return quantise(out.float(), dtype).clone()


class TeacherSignal:
    """No teacher: nothing to read, nothing to train (CE, adversarial CE)."""

    model: nn.Module | None = None   # the one teacher (frozen or online), else None
    models: list[nn.Module] = []     # every teacher network this run holds

    def __init__(self, task=None, data=None, eval_batch_size: int = 256, device=None,
                 precision: str = "32"):
        self.task, self.data = task, data
        self.eval_batch_size, self.device, self.precision = eval_batch_size, device, precision

    def begin_epoch(self, epoch: int) -> None:
        pass

    def train_logits(self, batch) -> torch.Tensor | None:
        return None

    def backward_loss(self, terms: dict) -> torch.Tensor:
        return terms["loss"]

    def zero_grad(self) -> None:
        pass

    def unscale(self, scaler) -> None:
        pass

    def clip_grad(self, max_norm: float) -> None:
        pass

    def step(self, scaler) -> None:
        pass

    def train(self) -> None:
        pass

    def trained_parameters(self) -> list:
        """Parameters this topology trains (averaged over data-parallel ranks)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        pass

    def reference(self, split: str) -> torch.Tensor | None:
        return None

    def references(self, split: str) -> dict[str, torch.Tensor]:
        return {}

    def epoch_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    def _predict(self, model: nn.Module, split: str) -> torch.Tensor:
        return self.task.predict(model, getattr(self.data, split), self.eval_batch_size,
                                 self.device, self.precision)[0]


class _Frozen(TeacherSignal):
    """Frozen teacher(s) whose outputs come from the output store (`outputs`: an epoch's train
    table, the eval tables) or from a live forward. `feeds_training`: the objective reads them
    (a CE baseline with a teacher only evaluates it)."""

    def __init__(self, models: list[nn.Module], outputs=None, dtype: str = "float32",
                 feeds_training: bool = True, **kw):
        super().__init__(**kw)
        self.models, self.outputs, self.dtype = list(models), outputs, dtype
        self.feeds_training = feeds_training
        self._table: torch.Tensor | None = None

    def begin_epoch(self, epoch: int) -> None:
        if self.outputs is not None and self.feeds_training:
            self._table = self.outputs.train_table(epoch)

    def summary(self) -> dict:
        return self.outputs.stats() if self.outputs is not None else {keys.TEACHER_OUTPUTS: "live"}


class FrozenTeacher(_Frozen):
    """One frozen teacher, served from the output store or run live every step. `transform`:
    the stored form of its training signal (`Task.stored_signal`), applied live alike; the
    evaluation references are its plain outputs."""

    def __init__(self, model: nn.Module, outputs=None, dtype: str = "float32",
                 feeds_training: bool = True, transform=None, **kw):
        super().__init__([model], outputs, dtype, feeds_training, **kw)
        self.model, self.transform = model, transform
        self._cached: dict[str, torch.Tensor] = {}

    def train_logits(self, batch) -> torch.Tensor:
        if self._table is not None:
            return self._table.index_select(0, batch.index)
        return frozen_logits(self.model, batch.x, self.dtype, self.transform)

    def _eval(self, split: str) -> torch.Tensor:
        """Evaluation splits are never augmented: a frozen teacher's outputs are fixed."""
        if split not in self._cached:
            stored = self.outputs is not None and self.outputs.serves_eval
            self._cached[split] = (self.outputs.eval_table(split, self.eval_batch_size)
                                   if stored else self._predict(self.model, split))
        return self._cached[split]

    def reference(self, split: str) -> torch.Tensor:
        return self._eval(split)

    def references(self, split: str) -> dict[str, torch.Tensor]:
        return {keys.TEACHER: self._eval(split)}


class TeacherPool(_Frozen):
    """Several frozen teachers: `[K, B, C]` stacked outputs, stored (a `PoolOutputs`) or live."""

    def train_logits(self, batch) -> torch.Tensor:
        if self._table is not None:   # [N, K, C] rows -> [K, B, C]
            return self._table.index_select(0, batch.index).transpose(0, 1)
        return torch.stack([frozen_logits(t, batch.x, self.dtype) for t in self.models])

    def references(self, split: str) -> dict[str, torch.Tensor]:
        out = {}
        for i, model in enumerate(self.models):
            out[keys.join(keys.TEACHERS, str(i))] = (
                self.outputs.members[i].eval_table(split, self.eval_batch_size)
                if self.outputs is not None else self._predict(model, split))
        return out


class OnlineTeacher(TeacherSignal):
    """A teacher that trains alongside the student (BD-KD): train mode, its own optimizer and
    scheduler, saved in checkpoints. Its loss comes back in the step's terms as `teacher_loss`
    (the objective computes it on the student's detached outputs), so one backward trains both."""

    def __init__(self, model: nn.Module, optimizer, scheduler, **kw):
        super().__init__(**kw)
        self.model, self.models = model, [model]
        self.optimizer, self.scheduler = optimizer, scheduler
        self._val: torch.Tensor | None = None

    def train_logits(self, batch) -> torch.Tensor:
        return self.model(batch.x).float()   # with gradient: the teacher learns too

    def backward_loss(self, terms: dict) -> torch.Tensor:
        return terms["loss"] + terms["teacher_loss"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def unscale(self, scaler) -> None:
        scaler.unscale_(self.optimizer)

    def clip_grad(self, max_norm: float) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, scaler) -> None:
        scaler.step(self.optimizer)   # skipped, like the student's, when fp16 overflowed
        self.scheduler.step()

    def train(self) -> None:
        self.model.train()

    def trained_parameters(self) -> list:
        return list(self.model.parameters())

    def state_dict(self) -> dict:
        return {"teacher_model": self.model.state_dict(),
                "teacher_optimizer": self.optimizer.state_dict(),
                "teacher_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["teacher_model"])
        self.optimizer.load_state_dict(ckpt["teacher_optimizer"])
        self.scheduler.load_state_dict(ckpt["teacher_scheduler"])

    def reference(self, split: str) -> torch.Tensor:
        """Recomputed every call: the teacher changes every step."""
        out = self._predict(self.model, split)
        if split == "val":
            self._val = out
        return out

    def references(self, split: str) -> dict[str, torch.Tensor]:
        return {keys.TEACHER: self.reference(split)}

    def summary(self) -> dict:
        return {keys.TEACHER_OUTPUTS: "live"}

    def epoch_metrics(self) -> dict:
        """The online teacher is a trained result too: its validation metrics every epoch
        (from the reference the epoch's evaluation just computed)."""
        if self._val is None:
            return {}
        t_val = self.task.score(self._val, self.data.val.targets)
        return {keys.join(keys.VAL, f"teacher_{k}"): v for k, v in t_val.items() if k != "n"}


class CriticTopology(FrozenTeacher):
    """A frozen teacher (run live, evaluated like any frozen teacher) and a CRITIC that trains
    online with its own optimizer, scheduler and gradient clip (losses/base.py
    `CriticObjective`: DMD's fake-score network and GAN head). The objective reads `model` and
    `critic` itself and returns the critic's loss as `critic_loss`: trained by the step's one
    backward with the student's (`critic_first` False), or by `update_critic` before the
    student's terms are computed (True). State: `critic_model`, `critic_optimizer`,
    `critic_scheduler` in every checkpoint."""

    def __init__(self, model: nn.Module, critic: nn.Module, optimizer, scheduler, *,
                 critic_first: bool, grad_clip: float | None, world, **kw):
        super().__init__(model, None, feeds_training=False, **kw)
        self.critic, self.optimizer, self.scheduler = critic, optimizer, scheduler
        self.critic_first, self.grad_clip, self.world = bool(critic_first), grad_clip, world

    def train_logits(self, batch):
        raise RuntimeError("a critic objective runs the teacher itself (step_terms)")

    def backward_loss(self, terms: dict) -> torch.Tensor:
        # `loss` is absent on a step where only the critic learns (a two-time-scale ratio)
        student = terms.get("loss", 0.0)
        if self.critic_first:   # stepped already; a non-finite critic loss still stops the run
            return student + 0.0 * terms["critic_loss"].detach()
        return student + terms["critic_loss"]

    def update_critic(self, loss: torch.Tensor) -> None:
        """One critic step now (critic_first): backward of `loss` into the critic only (it
        reads the student's samples detached), averaged over ranks, clipped, stepped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._apply(None)

    def _apply(self, scaler) -> None:
        params = self.trained_parameters()
        if self.critic_first:   # under torchrun: the engine averages only its own backward's
            self.world.average_gradients(params)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(params, float(self.grad_clip))
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
        self.scheduler.step()

    def zero_grad(self) -> None:
        if not self.critic_first:
            self.optimizer.zero_grad(set_to_none=True)

    def unscale(self, scaler) -> None:
        if not self.critic_first:
            scaler.unscale_(self.optimizer)

    def clip_grad(self, max_norm: float) -> None:
        """The critic has its own clip (`critic_grad_clip`), applied in `step`."""

    def step(self, scaler) -> None:
        if not self.critic_first:
            self._apply(scaler)

    def train(self) -> None:
        self.critic.train()

    def trained_parameters(self) -> list:
        return [p for p in self.critic.parameters() if p.requires_grad]

    def state_dict(self) -> dict:
        return {"critic_model": self.critic.state_dict(),
                "critic_optimizer": self.optimizer.state_dict(),
                "critic_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.critic.load_state_dict(ckpt["critic_model"])
        self.optimizer.load_state_dict(ckpt["critic_optimizer"])
        self.scheduler.load_state_dict(ckpt["critic_scheduler"])
