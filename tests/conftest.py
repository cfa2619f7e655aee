"""Shared fixtures: compose real Hydra configs from conf/ and run them in-process."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from distill_cli.config.paths import CONF_DIR
from distill_cli.runs import allocator

REPO = Path(__file__).resolve().parent.parent

# Tests never talk to W&B servers; the offline-W&B test sets WANDB_MODE itself.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Never touch the user's ~/.cache/distill_cli: a throwaway store for this test session
# (tests that inspect the store point DISTILL_HOME at their own tmp_path).
os.environ["DISTILL_HOME"] = tempfile.mkdtemp(prefix="distill-test-home-")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core
allocator.tune()  # as `distill` does: in-process runs at the CLI's speed (runs/allocator.py)
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the `tokenizers` BPE trainer's threads, likewise

# A tiny, fast run on sklearn digits (1x8x8, 10 classes): the integration tests' base.
# NCHW pinned: the runs that tests compare (and tests/test_pinned_run.py) predate `auto`.
DIGITS = ["dataset=digits", "logger=none", "trainer.batch_size=64", "trainer.epochs=2",
          "trainer.log_every_n_steps=5", "scheduler=none", "optimizer.lr=0.05",
          "trainer.channels_last=false"]


def make_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def cfg_factory():
    return make_cfg


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A resnet8 teacher trained on digits once per session; returns its best.pt."""
    from distill_cli.training.run import run

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run(make_cfg(DIGITS + ["student=resnet8", "loss=ce", "trainer.epochs=4"]), run_dir,
        tty=False)
    return run_dir / "checkpoints" / "best.pt"
