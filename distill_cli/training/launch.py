"""What one `distill` job runs: a single run, or a chain of self-distillation generations
(each an ordinary run). The only place that chooses between them."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill_cli.errors import UserError
from distill_cli.training.distributed import launched_by_torchrun
from distill_cli.training.generations import run_generations
from distill_cli.training.run import run


def launch(cfg: DictConfig, run_dir: str | Path | None = None, tty: bool | None = None) -> dict:
    if OmegaConf.select(cfg, "self_distill.generations", default=0):
        if launched_by_torchrun():
            raise UserError("self-distillation generations run in one process",
                            "self_distill.generations", "Run them with plain `distill`")
        return run_generations(cfg, run_dir, tty)
    return run(cfg, run_dir, tty)
