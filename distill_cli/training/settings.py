"""The trainer's settings, typed: read from `cfg.trainer` once, at the top of a run."""
from __future__ import annotations

from dataclasses import dataclass, fields


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

    @classmethod
    def from_config(cls, node, channels_last: bool) -> "TrainerSettings":
        """`node` is the composed `trainer` node; `channels_last` whether NHWC applies to this
        run (models/memory_format.py)."""
        known = {f.name for f in fields(cls)}
        values = {k: node.get(k) for k in known if node.get(k) is not None}
        values.update(epochs=int(node.epochs), batch_size=int(node.batch_size),
                      eval_batch_size=int(node.eval_batch_size), precision=str(node.precision),
                      channels_last=bool(channels_last), compile=bool(node.get("compile", False)))
        for key in ("log_every_n_steps", "checkpoint_every_n_steps", "stop_at_step"):
            if values.get(key) is not None:
                values[key] = int(values[key])
        return cls(**values)
