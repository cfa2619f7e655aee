"""Console entry points only. `distill` = Hydra app over conf/ (+ recipes/ as group `recipe`)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# conf/ sits beside the package in the checkout (editable install); see README.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

_task_started = False


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _distill(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from .errors import UserError, exit_with
    from .launcher import RunInterrupted, run

    try:
        run(cfg)
    except UserError as err:
        exit_with(err)
    except RunInterrupted as stop:
        sys.exit(stop.exit_code)


def distill_main() -> None:
    try:
        _distill()
    except SystemExit as exc:
        # Hydra reports composition errors (unknown group option, bad override) itself and
        # exits 1 before our task starts: those are user errors, so exit 2.
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    distill_main()
