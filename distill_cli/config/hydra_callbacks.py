"""Hydra callbacks. `RunDirGuard` runs before Hydra writes anything into the run dir, so an
explicit `hydra.run.dir` that already holds a run is never overwritten by accident."""
from __future__ import annotations

import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from distill_cli.errors import UserError, exit_with
from distill_cli.runs.directory import RunFinished, check_run_dir


class RunDirGuard(Callback):
    def on_run_start(self, config: DictConfig, **_) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return   # a torchrun rank other than 0: rank 0 guards the job's one run dir
        run_dir = Path(config.hydra.run.dir)
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
