"""Checks of benchmarks/bench_torchdistill.py's failure paths and arithmetic (not part of
`make test`: outside `testpaths`). Run:
    .venv/bin/python -m pytest -q -p no:xdist benchmarks/torchdistill/test_bench_torchdistill.py
The whole benchmark itself is checked by running it small:
    .venv/bin/python benchmarks/bench_torchdistill.py --limit 2000 --epochs 1 --out /tmp/td.md
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))
import bench_torchdistill as bench  # noqa: E402
from distill_cli.errors import UserError  # noqa: E402

SCRIPT = BENCH / "bench_torchdistill.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, key", [
    (["--limit", "100"], "--limit"),     # fewer images than one batch: nothing would train
    (["--epochs", "0"], "--epochs"),
    (["--threads", "0"], "--threads"),
])
def test_bad_arguments_exit_2_with_one_paragraph(args, key, tmp_path):
    done = run_script(*args, "--td-venv", str(tmp_path / "never-made"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and key in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "never-made").exists()   # refused before installing anything


def test_failed_install_is_a_user_error(tmp_path):
    """A venv whose python is broken: the version probe fails, the pinned reinstall fails,
    and the error says what ran and how to recover."""
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\necho 'no pip here' >&2\nexit 1\n")
    py.chmod(0o755)
    with pytest.raises(UserError) as err:
        bench.td_python(tmp_path / "venv")
    what, fix = err.value.what, err.value.fix   # unwrapped (paragraph() wraps long paths)
    assert "Installing torchdistill failed" in what and "no pip here" in what
    assert f"torchdistill=={bench.TORCHDISTILL}" in what and str(tmp_path / "venv") in fix


def test_failed_distill_run_is_a_user_error(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "DISTILL_HOME": str(tmp_path / "home")}
    with pytest.raises(UserError) as err:
        bench.distill(["dataset=no_such_dataset"], tmp_path / "run", env)
    assert "exited 2" in err.value.what and "no_such_dataset" in err.value.what


@pytest.mark.skipif(not (bench.TD_VENV / "bin" / "python").exists(),
                    reason="the torchdistill venv is made by the benchmark's first run")
def test_failed_torchdistill_run_is_a_user_error(tmp_path):
    """A work folder without the arrays file: the torchdistill job fails, the error tells how
    to rerun it by hand."""
    args = type("Args", (), {"epochs": 1, "batch": 256, "threads": 1})()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with pytest.raises(UserError) as err:
        bench.torchdistill_run(bench.TD_VENV / "bin" / "python", tmp_path, args, False, env)
    assert "torchdistill run exited" in err.value.what and "fashion_mnist.pt" in err.value.what
    assert f"cd {tmp_path}" in err.value.fix


def test_overall_ips_is_images_over_seconds():
    # two epochs of 100 images at 100 and 300 images/s: 200 images in 1 + 1/3 s
    assert bench.overall_ips([100.0, 300.0]) == pytest.approx(150.0)
    assert bench.overall_ips([250.0]) == pytest.approx(250.0)


def test_teacher_check_tolerates_one_flipped_sample_only():
    bench.check_same_teacher(91.23, 91.24)
    with pytest.raises(RuntimeError, match="teacher test acc1 differs"):
        bench.check_same_teacher(91.23, 90.0)
    with pytest.raises(RuntimeError):
        bench.check_same_teacher(None, 90.0)


def test_settings_check_refuses_a_run_under_other_settings():
    bench.check_setting("ours CE", "NCHW", "threads", 2, 2)
    with pytest.raises(RuntimeError, match="threads=1, not 2"):
        bench.check_setting("ours CE", "NCHW", "threads", 1, 2)
