"""Hydra callbacks. `RunDirGuard` runs before Hydra writes anything into the run dir, so an
explicit `hydra.run.dir` that already holds a run is never overwritten by accident, and a run
refused before it trained leaves no trace: `discard_refused_run_dir` removes the directories
Hydra created for it (its `.hydra/` and log), never one that existed before."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from distill_cli.errors import UserError, exit_with
from distill_cli.io import blocking_file
from distill_cli.runs.directory import RunFinished, check_run_dir


# The outermost directory this launch is about to create for its run dir (None: it exists).
_created_root: Path | None = None


def _first_missing(path: Path, key: str) -> Path | None:
    if (blocker := blocking_file(path / "x")) is not None:
        exit_with(UserError(f"The run dir {path} cannot be created: {blocker} is a file", key,
                            f"Choose a directory path for `{key}`"))
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def discard_refused_run_dir() -> bool:
    """Remove what Hydra created for a run that was refused before training (a user error):
    the run dir and any parents this launch created (e.g. `outputs/<date>/`). True if removed."""
    if _created_root is None or not _created_root.is_dir():
        return False
    # Only Hydra's own files: a run that wrote anything else (metrics, checkpoints) is kept.
    if all(".hydra" in f.parts or f.suffix == ".log" or f.name == "multirun.yaml"
           for f in _created_root.rglob("*") if not f.is_dir()):
        shutil.rmtree(_created_root, ignore_errors=True)
        return True
    return False


class RunDirGuard(Callback):
    def on_multirun_start(self, config: DictConfig, **_) -> None:
        global _created_root
        _created_root = _first_missing(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    def on_run_start(self, config: DictConfig, **_) -> None:
        global _created_root
        if int(os.environ.get("RANK", "0")) != 0:
            return   # a torchrun rank other than 0: rank 0 guards the job's one run dir
        run_dir = Path(config.hydra.run.dir)
        _created_root = _first_missing(run_dir, "hydra.run.dir")
        resume = config.trainer.get("resume")
        try:
            existing = check_run_dir(run_dir, resume)
        except RunFinished:   # trainer.resume=if_any: the run reports itself finished
            existing = True
        except UserError as err:
            exit_with(err)
        if existing and resume is not None:
            # Continuing in place: keep the run's original .hydra/ files (its true config).
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
