"""Teacher samples generated ONCE into the output store, one row per training sample, served by
index: the one seam through which the runner hands them to an objective.

An objective that trains on such samples declares (class attribute) `stored_samples = <kind>`
and `samples_options` (a dict: its YAML node, e.g. `loss.pairs` / `loss.sequences`), and
receives the built object through `use_samples(obj)`; `obj.get(index)` serves the rows of the
training samples `index`. training/teacher_setup.py calls `teacher_samples` for it and has no
branch per family. Kinds:

    pairs       a diffusion teacher's (noise, ODE endpoint) pairs     teachers/pairs.py
    sequences   an LM teacher's continuations of the training blocks  teachers/sequences.py

The builders are imported when used (an LM run never imports the diffusion samplers). Every
builder keys its table by the teacher's WEIGHTS (`weights_digest`, wherever the teacher came
from), the data identity and its own settings, so a sweep over students and methods pays for
the teacher's sampling once.
"""
from __future__ import annotations

import hashlib
import importlib

import torch

# kind -> "module:function"; each function is `f(teacher, data, *, store_root, **options)`
BUILDERS = {"pairs": "distill_cli.teachers.pairs:teacher_pairs",
            "sequences": "distill_cli.teachers.sequences:teacher_sequences"}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes and bytes), in state_dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def builder(kind: str):
    """The builder function of `kind` (a programming error, not a user's, when unknown: the
    kind is an objective's class attribute)."""
    if kind not in BUILDERS:
        raise ValueError(f"stored_samples={kind!r} is not a kind of teacher samples; known: "
                         f"{', '.join(BUILDERS)}")
    module, name = BUILDERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def teacher_samples(kind: str, teacher, data, *, store_root: str, **options):
    """The `kind` samples of `teacher` for every training sample of `data` (computed once)."""
    return builder(kind)(teacher, data, store_root=store_root, **options)
