"""The trainer's settings, typed: checked, then read from `cfg.trainer` once, at the top of a run.

`check_numbers` is the one place that knows the type and range of every numeric trainer and
seed key, so a wrong value is refused naming that key and the type it needs — before anything
calls `int()` on it (which would raise a traceback, or turn `trainer.epochs=0.5` into 0 and
blame whatever trips over that later).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from omegaconf import OmegaConf

from distill_cli.errors import UserError

#: trainer.on_nonfinite: what a step whose loss (or, with `skip`, gradient) is non-finite does
NONFINITE_POLICIES = ("stop", "skip")
_SEED_LIMIT = 2 ** 63   # derived seeds and torch.manual_seed take 63-bit non-negative seeds


@dataclass(frozen=True)
class _Number:
    kind: type           # int, or float (an int is a float too)
    minimum: float       # inclusive for int, exclusive for float
    example: str
    nullable: bool = False

    def problem(self, value) -> str | None:
        """Why `value` does not fit, phrased after "must be", or None."""
        if value is None and self.nullable:
            return None
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return self.expected()
        if self.kind is float and not math.isfinite(value):
            return self.expected()
        if self.kind is int and not (value >= self.minimum):
            return self.expected()
        if self.kind is float and not (value > self.minimum):
            return self.expected()
        return None

    def expected(self) -> str:
        what = (f"an integer >= {self.minimum:g}" if self.kind is int
                else f"a finite number > {self.minimum:g}")
        return what + (" or null" if self.nullable else "")


_COUNT = _Number(int, 1, "10")
TRAINER_NUMBERS = {
    "trainer.epochs": _COUNT,
    "trainer.batch_size": _Number(int, 1, "128"),
    "trainer.eval_batch_size": _Number(int, 1, "256"),
    "trainer.grad_clip": _Number(float, 0, "5.0", nullable=True),
    "trainer.log_every_n_steps": _Number(int, 1, "50"),
    "trainer.checkpoint_every_n_steps": _Number(int, 1, "500", nullable=True),
    "trainer.stop_at_step": _Number(int, 1, "100", nullable=True),
    # the teacher store trains with these (training/teacher_runs.py): checked up front too
    "teacher.train.epochs": _COUNT,
    "teacher.train.batch_size": _Number(int, 1, "128"),
}
SEED_KEYS = ("seed", "data_seed", "teacher.seed")
TRAINER_FLAGS = ("trainer.compile", "trainer.cudnn_benchmark", "trainer.sync_batchnorm")


def check_numbers(cfg) -> None:
    """Every numeric trainer key, seed and trainer flag of the composed config has its type
    and range; else a UserError naming the key, the expected type and an example."""
    for key, spec in TRAINER_NUMBERS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key.startswith("teacher."):
            continue   # absent: no teacher store recipe in this config
        if (problem := spec.problem(value)) is not None:
            raise UserError(f"`{key}` must be {problem}, got {_shown(value)}", key,
                            f"Pass e.g. {key}={spec.example}")
    seeds = [(key, OmegaConf.select(cfg, key, default=0)) for key in SEED_KEYS]
    for i, entry in enumerate(OmegaConf.select(cfg, "teachers", default=None) or []):
        if OmegaConf.is_dict(entry) and entry.get("seed") is not None:
            seeds.append((f"teachers[{i}].seed", entry.get("seed")))
    for key, value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value < _SEED_LIMIT):
            raise UserError(f"`{key}` must be an integer in [0, 2^63), got {_shown(value)}",
                            key, f"Pass e.g. {key}=0")
    for key in TRAINER_FLAGS:
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise UserError(f"`{key}` must be true or false, got {_shown(value)}", key,
                            f"Pass {key}=true or {key}=false")
    policy = OmegaConf.select(cfg, "trainer.on_nonfinite", default="stop")
    if policy not in NONFINITE_POLICIES:
        raise UserError(f"trainer.on_nonfinite={policy} is not a policy",
                        "trainer.on_nonfinite", "Use stop (end the run, status diverged) or "
                        "skip (skip such steps, counted in summary.json)")


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


@dataclass(frozen=True)
class TrainerSettings:
    epochs: int
    batch_size: int            # the global batch
    eval_batch_size: int
    precision: str = "32"      # 32 | bf16 (autocast)
    channels_last: bool = False  # NHWC for image inputs (already limited to (C, H, W) data)
    compile: bool = False
    grad_clip: float | None = None
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int | None = None
    stop_at_step: int | None = None
    on_nonfinite: str = "stop"   # stop | skip (NONFINITE_POLICIES)

    @classmethod
    def from_config(cls, node, channels_last: bool) -> "TrainerSettings":
        """`node` is the composed `trainer` node, already checked (`check_numbers`);
        `channels_last` whether NHWC applies to this run (models/memory_format.py)."""
        known = {f.name for f in fields(cls)}
        values = {k: node.get(k) for k in known if node.get(k) is not None}
        values.update(epochs=int(node.epochs), batch_size=int(node.batch_size),
                      eval_batch_size=int(node.eval_batch_size), precision=str(node.precision),
                      channels_last=bool(channels_last), compile=bool(node.get("compile", False)))
        for key in ("log_every_n_steps", "checkpoint_every_n_steps", "stop_at_step"):
            if values.get(key) is not None:
                values[key] = int(values[key])
        return cls(**values)
