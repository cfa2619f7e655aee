"""Checkpoints: plain dicts, written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint carries everything needed to continue bit-exactly: model, optimizer, scheduler
and objective state, position (epoch, step within the epoch, global step), the partial
epoch's accumulated train terms, best-so-far, RNG states, the resolved config, code version
and W&B run id.

`load` checks the structure before anyone indexes into it: an empty, truncated or hand-made
file is the user's error at the key that named it (exit 2), never a KeyError/TypeError deep in
the runner.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from distill_cli.errors import UserError
from distill_cli.io import atomic_write_bytes

FORMAT_VERSION = 1
# keys under which a checkpoint is loaded to CONTINUE a run: the optimizer & co. must be there
RESUME_KEYS = ("trainer.resume",)
_RESUME_FIELDS = ("optimizer", "scheduler", "objective", "state", "rng")
_FIX = "Use a checkpoint written by `distill`, such as <run>/checkpoints/best.pt of a finished run"


def save(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, lambda fh: torch.save({"format": FORMAT_VERSION, **payload}, fh))


def load(path: str | Path, key: str, *, resume: bool | None = None,
         fix: str | None = None) -> dict:
    """Load a checkpoint safely; a missing, unreadable or malformed file is the user's error at
    `key`. `resume` (default: `key` is `trainer.resume`) also requires what continuing a run
    reads (optimizer, scheduler, objective, state, RNG); `fix` replaces the advice given."""
    path = Path(path).expanduser()
    resume = key in RESUME_KEYS if resume is None else resume
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"Checkpoint {path} {what}", key,
                        fix or "Point it at a distill_cli checkpoint such as "
                               "<run>/checkpoints/best.pt")
    problem, ckpt = _read(path)
    if problem is None:
        problem = structure_problem(ckpt, resume)
    if problem is not None:
        raise UserError(f"Checkpoint {path} {problem}", key,
                        fix or (_resume_fix(path) if key in RESUME_KEYS else _FIX))
    return ckpt


def _read(path: Path) -> tuple[str | None, object]:
    """(why the file cannot be read or None, its content)."""
    if path.stat().st_size == 0:   # torch's own error for this has an empty message
        return "is empty (0 bytes)", None
    try:
        return None, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe pickle
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        return (f"cannot be read ({type(exc).__name__}"
                + (f": {first[:120]}" if first else "") + "); it is corrupt or not a "
                "distill_cli checkpoint"), None


def structure_problem(ckpt, resume: bool = False) -> str | None:
    """Why `ckpt` is not a distill_cli checkpoint (phrased after "Checkpoint <path>"), or None.
    Checks every field a reader indexes: `model` a state dict, `model_config` with its arch,
    `data` with the class count and input shape it was trained for, `config`; with `resume`
    also what `Engine.restore` reads."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a distill_cli checkpoint (a dict)"
    need = ("model", "model_config", "data", "config") + (_RESUME_FIELDS if resume else ())
    missing = [k for k in need if k not in ckpt]
    if missing:
        return (f"is not a distill_cli checkpoint: it lacks {', '.join(map(repr, missing))}"
                + (" (a resumable checkpoint is a run's checkpoints/last.pt or best.pt)"
                   if resume and set(missing) <= set(_RESUME_FIELDS) else ""))
    wrong = [f"`{k}` is a {type(ckpt[k]).__name__}" for k in need
             if not isinstance(ckpt[k], Mapping)]
    if wrong:
        return f"is malformed: {', '.join(wrong)} (expected a dict)"
    model = ckpt["model"]
    if not model or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                            for k, v in model.items()):
        return "is malformed: `model` is not a state dict (names → tensors)"
    if not isinstance(ckpt["model_config"].get("arch"), str):
        return "is malformed: `model_config` names no `arch`"
    data = ckpt["data"]
    classes, shape = data.get("num_classes"), data.get("input_shape")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        return f"is malformed: `data.num_classes` is {classes!r}"
    if not isinstance(shape, (list, tuple)) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return f"is malformed: `data.input_shape` is {shape!r}"
    if resume:
        state, rng = ckpt["state"], ckpt["rng"]
        bad = [k for k in ("epoch", "epoch_step", "step")
               if isinstance(state.get(k, 0), bool) or not isinstance(state.get(k, 0), int)]
        if bad:
            return f"is malformed: `state.{bad[0]}` is {state.get(bad[0])!r}"
        if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
            return "is malformed: `rng.torch` is not a torch RNG state"
    return None


def _resume_fix(path: Path) -> str:
    """What to do when the checkpoint a run would continue from is broken: never a silent
    restart. The run's best.pt (the best epoch so far) is offered when it is intact."""
    best = path.parent / "best.pt"
    if path.name != "best.pt" and best.is_file():
        problem, ckpt = _read(best)
        if problem is None and structure_problem(ckpt, resume=True) is None:
            epoch = ckpt["state"].get("epoch", "?")
            return (f"This run cannot be continued from it. Its {best} (epoch {epoch}) is intact: "
                    f"continue from there in a new run dir with trainer.resume={best} "
                    "hydra.run.dir=<new dir>, or start over in a new run dir (drop "
                    "trainer.resume)")
    return ("This run cannot be continued from it. Start over in a new run dir (drop "
            "trainer.resume and choose another hydra.run.dir), or pass trainer.resume=<an "
            "intact last.pt or best.pt> with a new hydra.run.dir")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
