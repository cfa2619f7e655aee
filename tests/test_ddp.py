"""Data-parallel training under real torchrun (gloo on CPU, 2 ranks, one thread each).

Marked `serial`: `make test` runs these after the parallel pytest-xdist pass, alone, so two
ranks never share the 2 cores with other test workers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.serial

BIN = Path(sys.executable).parent
BASE = ["dataset=digits", "logger=none", "trainer.batch_size=64", "trainer.epochs=2",
        "scheduler=none", "optimizer.lr=0.05", "student=mlp", "teacher=mlp",
        "teacher.train.epochs=1", "loss=kd"]


def launch(args, tmp_path, ranks: int | None = 2, check_rc=0, timeout=300):
    env = {**os.environ, "DISTILL_HOME": str(tmp_path / "home"), "WANDB_MODE": "disabled",
           "DISTILL_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    prog = ([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m",
             "distill_cli"] if ranks else [str(BIN / "distill")])
    proc = subprocess.run([*prog, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp_path)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_two_ranks_train_what_one_process_trains(tmp_path):
    """The global batch split over 2 ranks (DDP-averaged gradients) ends where one process
    ends, within 1e-5 relative; the teacher is trained once by the store (inside torchrun,
    while the other rank waits on the store's lock) and its outputs are served stored; the job
    has ONE run dir with one summary, written by rank 0."""
    two = launch(BASE + ["hydra.run.dir=two"], tmp_path)
    assert two.stdout.count("not in the store — training it first") == 1
    launch(BASE + ["hydra.run.dir=one"], tmp_path, ranks=None)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * float(a[k].abs().max())), k
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["status"] == "finished" and s2["teacher/outputs"] == "stored"
    assert s2["teacher/key"] == s1["teacher/key"]
    assert abs(s2["best/test/acc1"] - s1["best/test/acc1"]) < 0.5
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "outputs").exists()   # no stray per-rank run dirs


def test_default_run_dir_is_one_for_the_whole_job(tmp_path):
    launch(BASE + ["trainer.epochs=1", "loss=ce", "teacher=none"], tmp_path)
    dirs = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(dirs) == 1 and (dirs[0] / ".hydra" / "config.yaml").is_file()


def test_sigterm_stops_every_rank_and_the_job_resumes(tmp_path):
    run_dir = tmp_path / "long"
    args = ["dataset=fake", "dataset.train_size=20000", "dataset.shape=[1,16,16]",
            "logger=none", "student=mlp", "loss=ce", "trainer.epochs=6",
            "trainer.batch_size=32", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "DISTILL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                             "distill_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "summary.json").exists():
        time.sleep(0.2)
    time.sleep(1.0)   # some steps (the whole job takes ~10 s on a fast, idle machine)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", out[-2000:] + err[-2000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["step"] > 0
    resume = args + ["trainer.resume=auto"]   # as started: epochs may not change on resume
    # another world size would continue inexactly: refused, nothing changed
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    proc = launch(resume, tmp_path, ranks=None, check_rc=2)
    assert "trained on 2 process(es)" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    launch(resume, tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("extra,key", [(["loss=rkd"], "loss"),
                                       (["trainer.batch_size=63"], "trainer.batch_size")])
def test_what_ranks_cannot_compute_like_one_process_is_refused(tmp_path, extra, key):
    proc = launch(BASE + extra + ["hydra.run.dir=r"], tmp_path, check_rc=None)
    assert proc.returncode != 0
    assert f"Config key: `{key}`" in " ".join(proc.stderr.split())
    assert "distill_cli/" not in proc.stderr   # no traceback through our code (torchrun's own
    # report of a failed worker is torchrun's)
    assert not (tmp_path / "r" / "summary.json").exists()
