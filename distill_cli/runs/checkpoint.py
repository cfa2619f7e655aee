"""Checkpoints: plain dicts, written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint carries everything needed to continue bit-exactly: model, optimizer, scheduler
and objective state, position (epoch, step within the epoch, global step), the partial
epoch's accumulated train terms, best-so-far, RNG states, the resolved config, code version
and W&B run id.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from distill_cli.errors import UserError
from distill_cli.io import atomic_write_bytes

FORMAT_VERSION = 1
def save(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, lambda fh: torch.save({"format": FORMAT_VERSION, **payload}, fh))


def load(path: str | Path, key: str) -> dict:
    """Load a checkpoint safely; a missing or unreadable file is the user's error at `key`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist", key,
                        "Point it at a distill_cli checkpoint such as <run>/checkpoints/best.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe pickle
        raise UserError(f"Checkpoint {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})", key,
                        "The file is corrupt or not a distill_cli checkpoint; use another "
                        "checkpoint (e.g. checkpoints/best.pt of a finished run)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a distill_cli checkpoint (no model/model_config)", key,
                        "Use a checkpoint written by `distill`")
    return ckpt


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@lru_cache(maxsize=1)
def git_revision() -> str:
    """`<sha>[-dirty]` of the checkout this package runs from, or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
