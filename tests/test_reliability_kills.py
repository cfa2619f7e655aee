"""SIGKILL aimed at checkpoint writes, 20 times in a row, then a resume that ends bit for bit
where an uninterrupted run ends (issue #18 item 2).

Each attempt is a real process training into the same run dir with a checkpoint after every
step (`trainer.checkpoint_every_n_steps=1`, so most of its time is spent writing last.pt); it
is killed while one of ITS temp files (`.last.pt~<machine>~<pid>~*.tmp`, distill_cli/io.py) is
on disk, after a seeded random number of writes and a random sub-millisecond delay. After every
kill: last.pt loads or is absent (the first attempt is killed before its first checkpoint), and
the next attempt, `trainer.resume=auto`, removes what the killed writer left. The processes are
forked from a server that imported torch once (multiprocessing "forkserver"), so twenty starts
fit in the test's time; what they run is `run()`, what `distill` runs.
"""
from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import DIGITS, make_cfg
from distill_cli.runs import checkpoint
from distill_cli.training.run import run

pytestmark = pytest.mark.serial

KILLS = 20
# 8 epochs x 20 steps, one thread (the attempts and the reference must reduce alike)
BASE = DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=8", "trainer.threads=1",
                 "trainer.checkpoint_every_n_steps=1", "scheduler=cosine"]


def _attempt(config: dict, run_dir: str) -> None:
    run(OmegaConf.create(config), run_dir, tty=False)


def resolved(overrides: list[str]) -> dict:
    """The config composed HERE, every interpolation resolved: an attempt sees exactly what the
    final resume and the reference see (e.g. this session's store root, not its own)."""
    return OmegaConf.to_container(make_cfg(overrides), resolve=True)


def own_tmp(folder: Path, pid: int) -> list[Path]:
    return [p for p in folder.glob(".*.tmp") if f"~{pid}~" in p.name] if folder.is_dir() else []


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if "images_per_s" not in k} for ln in lines]


def test_twenty_kills_during_checkpoint_writes_then_an_exact_resume(tmp_path):
    rng = random.Random(18)
    ctx = multiprocessing.get_context("forkserver")
    # what an attempt imports, imported once (sklearn alone takes ~3 s: digits comes from it)
    ctx.set_forkserver_preload(["distill_cli.training.run", "distill_cli.data.digits",
                                "sklearn.datasets", "sklearn.model_selection"])
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    hits, stale, steps = 0, [], []
    started = time.time()
    for attempt in range(KILLS):
        overrides = BASE + ([] if attempt == 0 else ["trainer.resume=auto"])
        proc = ctx.Process(target=_attempt, args=(resolved(overrides), str(run_dir)))
        proc.start()
        deadline = time.time() + 60
        if attempt == 0:   # as soon as the run exists: (almost always) before its first checkpoint
            while not (run_dir / "summary.json").exists() and time.time() < deadline:
                pass
        writes = rng.randint(1, 4)   # then during its 1st-4th checkpoint write
        seen: set[str] = set()
        while attempt and len(seen) < writes and proc.is_alive() and time.time() < deadline:
            seen |= {p.name for p in own_tmp(ckpts, proc.pid)}
            if seen and not stale_gone(stale):
                pytest.fail(f"attempt {attempt} runs but left {stale} of dead writers")
        assert proc.is_alive(), "the run ended before it was killed: give it more steps"
        time.sleep(rng.uniform(0, 0.001))
        proc.kill()
        proc.join()
        stale = own_tmp(ckpts, proc.pid) + own_tmp(run_dir, proc.pid)
        hits += bool(stale)
        last = ckpts / "last.pt"
        if last.exists():   # whole, or absent: never a torn file
            steps.append(checkpoint.load(last, "trainer.resume")["state"]["step"])
    print(f"{hits} of {KILLS} kills left a temp file; last.pt after each: {steps}")
    assert hits >= KILLS // 4, f"only {hits} of {KILLS} kills landed during a write"
    assert steps == sorted(steps) and steps[-1] < 160   # progress, never past the end

    summary = run(make_cfg(BASE + ["trainer.resume=auto"]), run_dir, tty=False)
    assert summary["status"] == "finished" and summary["step"] == 160
    assert list(run_dir.rglob("*.tmp")) == []   # the last start removed the dead writers'
    reference = tmp_path / "uninterrupted"
    run(make_cfg(BASE), reference, tty=False)
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ckpts / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert metrics(run_dir) == metrics(reference)
    assert time.time() - started < 120


def stale_gone(stale: list[Path]) -> bool:
    """Once the new attempt writes, what the killed one left is gone (its start removed it)."""
    return not any(p.exists() for p in stale)
