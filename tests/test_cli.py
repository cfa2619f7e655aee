"""The `distill` command as a user runs it: help, config printing, completion, errors with
exit code 2 and no traceback, a -m sweep, and SIGTERM → resume."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DIGITS

DISTILL = str(Path(sys.executable).parent / "distill")
GROUPS = ["teacher", "student", "loss", "dataset", "optimizer", "scheduler", "trainer", "logger"]


def distill(*args, tmp_path, env=None, timeout=300, check_rc=None, prog=(DISTILL,), cwd=None):
    full_env = {**os.environ, "DISTILL_OUTPUTS": str(tmp_path / "outputs"),
                "DISTILL_MULTIRUN": str(tmp_path / "multirun"), "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*prog, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file under `dirs` with the hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


def refused(args: list[str], tmp_path: Path, key: str, *watch: Path) -> str:
    """Run `distill args`: exit 2, no traceback, the key named, `watch` untouched, and the run
    dir not created. Returns stderr as one line."""
    run_dir = tmp_path / "refused_run"
    before = snapshot(*watch)
    proc = distill(*args, f"hydra.run.dir={run_dir}", tmp_path=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert f"`{key}`" in proc.stderr, proc.stderr
    assert snapshot(*watch) == before
    assert not (run_dir / "checkpoints").exists()
    return "".join(proc.stderr.split())   # errors.py wraps long paths at their hyphens


def test_help_lists_every_group_with_its_options(tmp_path):
    out = distill("--help", tmp_path=tmp_path, check_rc=0).stdout
    for group in GROUPS:
        assert f"{group}:" in out, group
    for option in ("resnet32x4", "wrn_40_2", "fashion_mnist", "digits", "dkd", "adamw",
                   "multistep", "wandb"):
        assert option in out, option


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = distill("--cfg", "job", "student=wrn_16_2", "loss=dkd", tmp_path=tmp_path,
                  check_rc=0).stdout
    assert "arch: wrn_16_2" in out and "distill_cli.losses.dkd.DKD" in out and "seed: 0" in out


def test_python_m_distill_cli_is_distill_from_any_directory(tmp_path):
    """`python -m distill_cli` (what torchrun starts) is `distill`, run from outside the
    checkout: the configs come from the package, not the working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python_m = (sys.executable, "-m", "distill_cli")
    args = ("--cfg", "job", "student=wrn_16_2", "loss=dkd")
    out = distill(*args, tmp_path=tmp_path, prog=python_m, cwd=elsewhere, check_rc=0).stdout
    assert "arch: wrn_16_2" in out and "distill_cli.losses.dkd.DKD" in out and "seed: 0" in out
    assert out == distill(*args, tmp_path=tmp_path, cwd=elsewhere, check_rc=0).stdout
    assert "recipe: " in distill("--help", tmp_path=tmp_path, prog=python_m, cwd=elsewhere,
                                 check_rc=0).stdout
    proc = distill("loss=nope", tmp_path=tmp_path, prog=python_m, cwd=elsewhere, check_rc=2)
    assert "Could not find 'loss/nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert list(elsewhere.iterdir()) == []  # no run dir, no outputs/ in the working directory


def test_shell_completion_script(tmp_path):
    out = distill("-sc", "install=bash", tmp_path=tmp_path, check_rc=0).stdout
    assert "complete" in out and "distill" in out


def test_unknown_group_option_exits_2_with_the_options(tmp_path):
    proc = distill("loss=nope", tmp_path=tmp_path, check_rc=2)
    assert "Could not find 'loss/nope'" in proc.stderr and "dkd" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_config_group_set_to_null_exits_2_with_the_fix(tmp_path):
    proc = distill("recipe=null", "--cfg", "job", tmp_path=tmp_path, check_rc=2)
    assert proc.stderr.startswith("error: `recipe=null`") and "Leave `recipe`" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_user_error_exits_2_with_one_paragraph(tmp_path):
    proc = distill(*DIGITS, "loss=kd", tmp_path=tmp_path, check_rc=2)
    assert proc.stderr.startswith("error: ") and "teacher" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n\n") == 0


def test_explicit_run_dir_holding_a_finished_run_is_refused(tmp_path):
    run_dir = tmp_path / "fixed"
    args = [*DIGITS, "student=mlp", "loss=ce", "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    distill(*args, tmp_path=tmp_path, check_rc=0)
    hydra_cfg = (run_dir / ".hydra" / "config.yaml").read_bytes()
    summary = (run_dir / "summary.json").read_bytes()
    proc = distill(*args[:-2], "trainer.epochs=2", f"hydra.run.dir={run_dir}",
                   tmp_path=tmp_path, check_rc=2)
    assert "already holds a run" in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == hydra_cfg
    assert (run_dir / "summary.json").read_bytes() == summary


def test_sweep_makes_one_run_dir_per_job(tmp_path):
    teacher_dir = tmp_path / "teacher"
    distill(*DIGITS, "student=resnet8", "loss=ce", "trainer.epochs=2",
            f"hydra.run.dir={teacher_dir}", tmp_path=tmp_path, check_rc=0)
    ckpt = teacher_dir / "checkpoints" / "best.pt"
    distill("-m", *DIGITS, "teacher=resnet8", f"teacher.checkpoint={ckpt}", "student=mlp",
            "trainer.epochs=1", "loss=ce,kd,dkd", "seed=0,1", tmp_path=tmp_path, check_rc=0)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "multirun").rglob("summary.json")]
    assert len(summaries) == 6
    assert {(s["loss"], s["seed"]) for s in summaries} == {
        (loss, seed) for loss in ("CrossEntropy", "KD", "DKD") for seed in (0, 1)}
    assert all(s["status"] == "finished" for s in summaries)
    assert len({s["run_dir"] for s in summaries}) == 6


def test_sigterm_writes_last_and_resume_finishes(tmp_path):
    """SIGTERM mid-run → exit 143 with a resumable last.pt; resuming with another
    trainer.epochs is refused (it would end unlike a clean run of that length), resuming as
    started finishes, and a shorter fork from last.pt finishes too."""
    import torch

    run_dir = tmp_path / "long"
    args = ["dataset=fake", "dataset.train_size=20000", "dataset.shape=[1,16,16]",
            "logger=none", "student=mlp", "loss=ce", "trainer.epochs=8",
            "trainer.batch_size=32", "trainer.log_every_n_steps=10", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "DISTILL_OUTPUTS": str(tmp_path / "o"), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([DISTILL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "summary.json").exists():
        time.sleep(0.2)
    time.sleep(0.5)  # let it take some steps (the whole run takes ~5 s on a fast, idle machine)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)["state"]
    assert state["step"] > 0 and "trainer.resume=auto" in out
    other = [a for a in args if not a.startswith("trainer.epochs")]
    refused = distill(*other, "trainer.epochs=9", "trainer.resume=auto", tmp_path=tmp_path,
                      check_rc=2)
    assert "trainer.epochs: 8 →" in " ".join(refused.stderr.split())
    shorter = other + [f"trainer.epochs={state['epoch'] + 1}"]
    fork = [a for a in shorter if not a.startswith("hydra.run.dir")] + [
        f"trainer.resume={last}", f"hydra.run.dir={tmp_path / 'fork'}"]
    distill(*fork, tmp_path=tmp_path, check_rc=0)
    assert json.loads((tmp_path / "fork" / "summary.json").read_text())["status"] == "finished"
    distill(*args, "trainer.resume=auto", tmp_path=tmp_path, check_rc=0)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_parallel_sweep_with_a_stored_teacher_and_its_report(tmp_path):
    """End to end: joblib sweep on digits; one stored teacher shared by all jobs; the report
    pools seeds and computes the gain over the CE baseline."""
    home = tmp_path / "home"
    distill("-m", "hydra/launcher=local_parallel", *DIGITS, "teacher=resnet8",
            "teacher.train.epochs=3", "student=mlp", "trainer.epochs=3", "loss=ce,kd",
            "seed=0,1", tmp_path=tmp_path, env={"DISTILL_HOME": str(home)}, check_rc=0)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "multirun").rglob("summary.json")]
    assert len(summaries) == 4 and all(s["status"] == "finished" for s in summaries)
    assert len({s["teacher/key"] for s in summaries}) == 1
    assert sum(not s["teacher/store_hit"] for s in summaries) == 1  # trained exactly once
    assert len(list((home / "teachers").glob("*/entry.json"))) == 1
    sweep = next((tmp_path / "multirun").glob("*/*"))
    rows = json.loads(subprocess.run(
        [str(Path(DISTILL).parent / "distill-report"), str(sweep), "--format", "json"],
        capture_output=True, text=True, check=True).stdout)
    by_loss = {r["loss"]: r for r in rows}
    assert by_loss["KD"]["n"] == by_loss["CrossEntropy"]["n"] == 2
    ce = [s["best/test/acc1"] for s in summaries if s["loss"] == "CrossEntropy"]
    kd = [s["best/test/acc1"] for s in summaries if s["loss"] == "KD"]
    assert by_loss["KD"]["gain"] == pytest.approx(sum(kd) / 2 - sum(ce) / 2)


@pytest.mark.parametrize("flag", ["0", "1", None])
def test_entry_point_tunes_the_allocator_unless_told_not_to(tmp_path, flag):
    run_dir = tmp_path / "r"
    env = {} if flag is None else {"DISTILL_MALLOC_TUNING": flag}
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "DISTILL_MALLOC_TUNING"}
    proc = subprocess.run([DISTILL, *DIGITS, "student=mlp", "loss=ce", "trainer.epochs=1",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env={**clean, "WANDB_MODE": "disabled", **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["malloc_tuned"] is (flag != "0")
