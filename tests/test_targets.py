"""The allow-list (distill_cli/config/targets.py): nothing from a config file or the command line
runs code outside it — callbacks, launchers, sweepers and logging handlers included — and a run
refused before training leaves nothing behind (no `outputs/<date>/<time>/`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.config.targets import check_callable, check_config
from distill_cli.errors import UserError

from test_cli import DISTILL, distill

B = ["dataset=digits", "student=mlp", "trainer.epochs=1", "logger=none",
     "trainer.channels_last=false"]


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def refused(tmp_path, *args, key: str):
    """Run `distill` from an empty cwd: exit 2, one paragraph naming `key`, nothing created."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    before = files_under(tmp_path)
    flags = [a for a in args if a.startswith("-") and "=" not in a]
    args = [a for a in args if a not in flags]
    proc = distill(*flags, *B, *args, tmp_path=tmp_path, cwd=cwd, env={"DISTILL_OUTPUTS": "outputs",
                                                               "DISTILL_MULTIRUN": "multirun"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"`{key}`" in proc.stderr, proc.stderr
    assert files_under(tmp_path) == before, files_under(tmp_path) - before
    return proc.stderr


# --------------------------------------------------------------- attacks through the real CLI
def test_attribute_path_through_a_module_is_refused(tmp_path):
    made = tmp_path / "pwn"
    refused(tmp_path, "loss._target_=distill_cli.runs.checkpoint.os.makedirs",
            f"+loss._args_=[{made}]", "~loss.label_smoothing", key="loss._target_")


def test_torch_load_reached_through_a_module_is_refused(tmp_path):
    refused(tmp_path, "loss._target_=distill_cli.runs.checkpoint.torch.load",
            f"+loss.f={tmp_path}/x.pt", "+loss.weights_only=false", "~loss.label_smoothing",
            key="loss._target_")


def test_callback_target_is_refused_before_hydra_builds_it(tmp_path):
    refused(tmp_path, "+hydra.callbacks.x._target_=os.makedirs",
            f"+hydra.callbacks.x.name={tmp_path}/pwn", key="hydra.callbacks.x._target_")


def test_package_function_of_the_wrong_kind_is_refused(tmp_path):
    refused(tmp_path, "loss._target_=distill_cli.io.write_json", key="loss._target_")


def test_method_reached_through_a_class_is_refused(tmp_path):
    refused(tmp_path, "loss._target_=distill_cli.losses.kd.KD.load_state_dict",
            key="loss._target_")


def test_logging_handler_factory_is_refused(tmp_path):
    refused(tmp_path, "hydra.job_logging.handlers.console.class=os.makedirs",
            key="hydra.job_logging.handlers.console.class")


def test_standard_library_cannot_be_opted_in(tmp_path):
    refused(tmp_path, "allow_targets=[os]", "loss._target_=os.makedirs", key="allow_targets")


def test_refused_inside_a_sweep_job_too(tmp_path):
    """A sweep job's config is composed by the launcher, not by Hydra's run: checked again."""
    refused(tmp_path, "-m", "optimizer._target_=torch.optim.sgd.torch.load,distill_cli.losses.kd.KD",
            key="optimizer._target_")


def test_users_own_package_only_when_opted_in(tmp_path):
    pkg = tmp_path / "lib" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "losses.py").write_text(
        "from distill_cli.losses.ce import CrossEntropy\n\n\n"
        "class MyCE(CrossEntropy):\n    pass\n")
    env = {"PYTHONPATH": str(tmp_path / "lib")}
    args = [*B, "loss._target_=mypkg.losses.MyCE", f"hydra.run.dir={tmp_path}/run"]
    proc = distill(*args, tmp_path=tmp_path, env=env)
    assert proc.returncode == 2 and "allow_targets=[yourpkg]" in " ".join(proc.stderr.split())
    distill(*args, "allow_targets=[mypkg]", tmp_path=tmp_path, env=env, check_rc=0)
    assert (tmp_path / "run" / "summary.json").is_file()


# ------------------------------------------------------------------------- the rules in-process
SHIPPED_GROUPS = ["loss", "student", "dataset", "optimizer", "scheduler", "logger", "task",
                  "recipe", "hydra/launcher", "hydra/sweeper"]


def shipped_options(group: str) -> list[str]:
    names = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    if group == "hydra/launcher":
        names += ["basic", "joblib", "submitit_local", "submitit_slurm"]
    if group == "hydra/sweeper":
        names += ["basic", "optuna"]
    return names


@pytest.mark.parametrize("group", SHIPPED_GROUPS)   # one test a group: the workers share them
def test_every_shipped_config_passes(group):
    """All options of every group, and Hydra's launchers/sweepers, compose and pass."""
    names = shipped_options(group)
    assert names, group
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name in names:
            cfg = compose("config", overrides=[f"{group}={name}"], return_hydra_config=True)
            check_config(cfg)


def test_the_shipped_groups_hold_the_options():
    assert sum(len(shipped_options(g)) for g in SHIPPED_GROUPS) > 60


def test_interpolated_node_is_checked_like_a_written_one():
    cfg = OmegaConf.create({"loss": "${oc.create:'{_target_: os.getcwd}'}"})
    with pytest.raises(UserError, match="loss._target_"):
        check_config(cfg)


@pytest.mark.parametrize("target, ok", [
    ("distill_cli.losses.kd.KD", True),
    ("distill_cli.losses.kd.torch.load", False),        # a module attribute path
    ("distill_cli.losses.kd.KD.forward", False),        # a class attribute path
    ("distill_cli.losses.base.np", False),              # not a class or function
    ("distill_cli.losses", False),                      # a module
    ("distill_cli.losses.kd.F.kl_div", False),
    ("distill_cli.losses.nonexistent.Thing", False),
    ("os.system", False),
    ("distill_cli.losses.kd.KD; rm -rf /", False),
])
def test_rules(target, ok):
    packages = ("distill_cli.losses",)
    if ok:
        check_callable(target, "loss._target_", packages)
    else:
        with pytest.raises(UserError):
            check_callable(target, "loss._target_", packages)


def test_nodes_get_only_their_own_kind():
    node = OmegaConf.create({"_target_": "distill_cli.losses.kd.KD"})
    with pytest.raises(UserError, match="optimizer._target_"):
        build.instantiate(node, "optimizer")
    build.instantiate(node, "loss")
    with pytest.raises(UserError):
        build.instantiate(OmegaConf.create({"_target_": "torch.optim.SGD"}), "loss")


# ------------------------------------------------- refused runs and start-up leave nothing behind
def test_refused_run_leaves_no_output_dir(tmp_path):
    refused(tmp_path, "trainer.batch_size=100000", key="trainer.batch_size")


def test_refused_sweep_leaves_no_sweep_dir(tmp_path):
    refused(tmp_path, "-m", "trainer.batch_size=100000,200000", key="trainer.batch_size")


def test_run_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(tmp_path, f"hydra.run.dir={tmp_path}/afile/run", key="hydra.run.dir")


def test_report_plot_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([str(Path(DISTILL).parent / "distill-report"), str(tmp_path),
                           "--plot", str(tmp_path / "afile" / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--plot" in proc.stderr


@pytest.mark.parametrize("when", ["start-up", "run dir created"])
def test_ctrl_c_before_training_is_quiet(tmp_path, when):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([DISTILL, *B, f"hydra.run.dir={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "start-up":
        time.sleep(0.5)
    else:   # Hydra has written .hydra/: the run is composed, data and model not yet trained
        deadline = time.monotonic() + 60
        while not (run_dir / ".hydra" / "config.yaml").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:   # the run finished before the signal: nothing to check
        return
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted" in err
    assert not run_dir.exists() or (run_dir / "metrics.jsonl").exists()
