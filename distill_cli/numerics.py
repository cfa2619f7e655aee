"""Numeric formats shared by the training loop and the teacher-output store."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `trainer.precision=bf16`, else a no-op context."""
    if str(precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def quantise(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Teacher logits as they would come back from the output store: applied on the live path
    too, so the storage dtype (`teacher.outputs_dtype`) never changes what a run computes."""
    return logits if dtype == "float32" else logits.to(torch.float16).float()
