"""Numeric formats shared by the training loop and the teacher-output store."""
from __future__ import annotations

import contextlib

import torch


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast for `trainer.precision=bf16|fp16`, else a no-op context."""
    if str(precision) in AUTOCAST:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST[str(precision)])
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16's loss scaling (its gradients underflow without it); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=str(precision) == "fp16")


def quantise(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Teacher logits as they would come back from the output store: applied on the live path
    too, so the storage dtype (`teacher.outputs_dtype`) never changes what a run computes."""
    return logits if dtype == "float32" else logits.to(torch.float16).float()
