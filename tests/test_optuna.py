"""Optuna sweeps (`distill -m hydra/sweeper=optuna_task ...`, the `sweep` extra): each job returns
its validation selection metric (best/val/acc1), the study maximises it, every trial is an
ordinary run dir that `distill-report` tabulates; a missing plugin or a minimising study is a
one-paragraph error (exit 2) before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DISTILL = str(Path(sys.executable).parent / "distill")
REPORT = str(Path(sys.executable).parent / "distill-report")
TINY = ["dataset=digits", "logger=none", "trainer.epochs=1", "trainer.batch_size=64",
        "student=mlp", "loss=dkd", "teacher=mlp", "teacher.train.epochs=1"]
TEMPERATURES = (1, 2, 4)


def env_for(tmp_path: Path) -> dict:
    return {**os.environ, "DISTILL_HOME": str(tmp_path / "home"),
            "DISTILL_MULTIRUN": str(tmp_path / "multirun"),
            "DISTILL_OUTPUTS": str(tmp_path / "outputs"), "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1"}


def test_optuna_sweep_maximises_val_acc1_one_run_dir_per_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="the `sweep` extra (make install installs it)")
    proc = subprocess.run(
        [DISTILL, "-m", "hydra/sweeper=optuna_task", "hydra.sweeper.n_trials=3",
         "hydra.sweeper.sampler.seed=0", *TINY, "optimizer.lr=interval(0.01,0.2)",
         f"loss.temperature=choice({','.join(map(str, TEMPERATURES))})"],
        capture_output=True, text=True, env=env_for(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Directions: ['maximize']" in proc.stdout + proc.stderr

    (sweep,) = (tmp_path / "multirun").glob("*/*")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [t.name for t in trials] == ["0", "1", "2"]       # one run dir per trial
    summaries = [json.loads((t / "summary.json").read_text()) for t in trials]
    assert all(s["status"] == "finished" and s["task"] == "classification" for s in summaries)
    assert len({s["teacher/key"] for s in summaries}) == 1   # one stored teacher, trained once
    params = [dict(o.split("=", 1) for o in s["overrides"]) for s in summaries]
    assert all(0.01 <= float(p["optimizer.lr"]) <= 0.2 for p in params)
    assert all(int(p["loss.temperature"]) in TEMPERATURES for p in params)

    # the objective is validation acc1 (never test), and the study keeps the highest
    vals = [s["best/val/acc1"] for s in summaries]
    assert results["best_value"] == pytest.approx(max(vals))
    best = params[vals.index(max(vals))]
    assert results["best_params"]["optimizer.lr"] == pytest.approx(float(best["optimizer.lr"]))
    assert results["best_params"]["loss.temperature"] == int(best["loss.temperature"])

    # the report still tabulates the trials (one row per sampled configuration)
    rows = json.loads(subprocess.run([REPORT, str(sweep), "--metric", "best/val/acc1",
                                      "--format", "json"], capture_output=True, text=True,
                                     check=True, env=env_for(tmp_path)).stdout)
    assert sorted(r["n"] for r in rows) == [1, 1, 1]
    assert max(r["best/val/acc1"] for r in rows) == pytest.approx(results["best_value"])


def test_plain_optuna_must_say_maximize(tmp_path):
    """The plugin's own default direction is minimize: refused before a sweep dir exists."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = subprocess.run([DISTILL, "-m", "hydra/sweeper=optuna", *TINY],
                          capture_output=True, text=True, env=env_for(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "hydra.sweeper.direction=maximize" in proc.stderr
    assert "hydra/sweeper=optuna_task" in proc.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("sweeper", ["optuna", "optuna_task"])
def test_missing_plugin_says_what_to_install(tmp_path, sweeper):
    """Without hydra-optuna-sweeper Hydra only says it cannot find `hydra/sweeper/optuna`."""
    hide = ("import importlib.util as u, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n.startswith('hydra_plugins.hydra_optuna') "
            "else f(n, *a); "
            "from distill_cli.cli import distill_main; distill_main()")
    proc = subprocess.run([sys.executable, "-c", hide, "-m", f"hydra/sweeper={sweeper}", *TINY],
                          capture_output=True, text=True, env=env_for(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "hydra-optuna-sweeper" in proc.stderr and "[sweep]" in proc.stderr
    assert not (tmp_path / "multirun").exists()
