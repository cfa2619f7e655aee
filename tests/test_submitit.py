"""SLURM and local job arrays through hydra-submitit-launcher (conf/hydra/launcher/slurm.yaml and
local_array.yaml), and `trainer.resume=if_any`, with which a requeued job continues its run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.runs.directory import RunFinished, check_run_dir, resolve_resume
from distill_cli.training.run import RunInterrupted, run

from conftest import DIGITS, REPO, make_cfg

DISTILL = str(Path(sys.executable).parent / "distill")
TINY = ["dataset=digits", "logger=none", "student=mlp", "trainer.batch_size=64",
        "scheduler=none", "optimizer.lr=0.05"]


def distill(*args, tmp_path, check_rc=None, env=None, timeout=240):
    env = {**os.environ, "DISTILL_OUTPUTS": str(tmp_path / "outputs"),
           "DISTILL_MULTIRUN": str(tmp_path / "multirun"), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([DISTILL, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "images_per_s" not in k} for r in rows]


def snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


# ------------------------------------------------------------------ trainer.resume=if_any
def test_if_any_rules_for_each_kind_of_run_dir(tmp_path):
    empty = tmp_path / "empty"
    assert check_run_dir(empty, "if_any") is False and resolve_resume(empty, "if_any") is None
    early = tmp_path / "early"   # stopped before its first checkpoint: nothing to lose
    early.mkdir()
    (early / "summary.json").write_text(json.dumps({"status": "running"}))
    assert check_run_dir(early, "if_any") is False and resolve_resume(early, "if_any") is None
    with pytest.raises(UserError, match="already holds a run"):
        check_run_dir(early, None)   # a plain launch still refuses it
    (early / "checkpoints").mkdir()
    (early / "checkpoints" / "last.pt").write_bytes(b"x")
    for status in ("running", "interrupted", "failed"):   # killed, signalled, crashed
        (early / "summary.json").write_text(json.dumps({"status": status}))
        assert check_run_dir(early, "if_any") is True
        assert resolve_resume(early, "if_any") == early / "checkpoints" / "last.pt"
    gens = tmp_path / "gens"   # a self-distillation run continues from its generations
    gens.mkdir()
    (gens / "summary.json").write_text(json.dumps({"status": "running", "generations": []}))
    assert check_run_dir(gens, "if_any") is True
    lost = tmp_path / "lost"   # epochs recorded, last.pt gone: refused, never overwritten
    lost.mkdir()
    (lost / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(UserError, match="no checkpoints/last.pt"):
        check_run_dir(lost, "if_any")
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "finished", "best/val/acc1": 9.0}))
    with pytest.raises(RunFinished) as info:
        check_run_dir(done, "if_any")
    assert info.value.exit_code == 0 and info.value.summary["best/val/acc1"] == 9.0
    assert "already finished" in " ".join(info.value.paragraph().split())


def test_if_any_starts_fresh_continues_bit_exactly_and_leaves_a_finished_run(tmp_path):
    base = TINY + ["loss=ce", "trainer.epochs=2"]
    full = tmp_path / "full"
    run(make_cfg(base), full, tty=False)

    parted = tmp_path / "parted"   # empty: if_any starts a fresh run
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.resume=if_any", "trainer.stop_at_step=7"]), parted,
            tty=False)
    assert json.loads((parted / "summary.json").read_text())["status"] == "interrupted"
    run(make_cfg(base + ["trainer.resume=if_any"]), parted, tty=False)   # continues
    a, b = weights(full), weights(parted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(full) == metrics(parted)

    before = snapshot(parted)   # finished: reported, nothing rerun or rewritten
    try:
        summary = run(make_cfg(base + ["trainer.resume=if_any"]), parted, tty=False)
    except RunFinished as done:   # training/run.py lets it reach the CLI (exit 0)
        summary = done.summary
    assert summary == json.loads((parted / "summary.json").read_text())
    assert summary["status"] == "finished" and snapshot(parted) == before


# ------------------------------------------------------------------ presets
def test_presets_are_listed_and_the_slurm_preset_composes(tmp_path):
    options = next(line for line in distill("--hydra-help", tmp_path=tmp_path,
                                            check_rc=0).stdout.splitlines()
                   if line.startswith("hydra/launcher:"))
    assert {"slurm", "local_array", "submitit_slurm", "submitit_local"} <= {
        o.strip() for o in options.partition(":")[2].split(",")}
    out = distill("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                  tmp_path=tmp_path, check_rc=0).stdout
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"],
            launcher["timeout_min"], launcher["signal_delay_s"],
            launcher["max_num_timeout"]) == ("gpu", 1, 1, 1440, 120, 20)
    assert launcher["additional_parameters"] == {"requeue": True}


@pytest.fixture
def compose_hydra():
    """Compose with the hydra node and set it as the current HydraConfig (the launcher resolves
    `${hydra.sweep.dir}` through it); unset afterwards, so no later in-process run sees it."""
    def compose_with_hydra(overrides: list[str]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield compose_with_hydra
    HydraConfig.instance().cfg = None


def test_slurm_submission_script_for_a_2_gpu_ddp_job(tmp_path, monkeypatch, compose_hydra):
    """The plugin's own launch() and submitit's own sbatch writer; `sbatch` and `srun` are stubs
    (the stub sbatch keeps the script it was given)."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$1")/sbatch.sh"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: ["done"])
    sweep = tmp_path / "sweep"
    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                          "hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=2",
                          f"hydra.sweep.dir={sweep}"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = SlurmLauncher(**{k: v for k, v in params.items() if k != "_target_"})
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["loss=ce"], ["loss=kd"]], initial_job_idx=0) == ["done", "done"]

    script = (sweep / ".submitit" / "sbatch.sh").read_text().splitlines()
    for line in ("#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --time=1440",
                 "#SBATCH --requeue", "#SBATCH --cpus-per-task=8", "#SBATCH --array=0-1%2"):
        assert line in script, line
    assert any(ln.startswith("srun ") and "submitit.core._submit" in ln for ln in script)
    # each array task's pickle: the same launcher job, requeued up to 20 times after timeouts;
    # on USR2 its checkpoint() is that same job again (same overrides, same job num: run dir)
    job = submitit.helpers.DelayedSubmission.load(
        sweep / ".submitit" / "4242_1" / "4242_1_submitted.pkl")
    assert job._timeout_countdown == 20 and job._timeout_min == 1440
    assert job.args[0] == ["loss=kd"] and job.args[2] == 1
    again = job._checkpoint_function()
    assert again.args[:3] == job.args[:3] and type(again.function) is SlurmLauncher


def test_a_missing_plugin_is_a_clean_error(tmp_path):
    """An environment without hydra-submitit-launcher: this venv's packages less submitit and
    the plugin (python -S, a symlinked copy of site-packages)."""
    site = Path(submitit.__file__).resolve().parent.parent
    shadow = tmp_path / "site"
    (shadow / "hydra_plugins").mkdir(parents=True)
    for entry in site.iterdir():
        name = entry.name
        if name == "hydra_plugins":
            for plugin in entry.iterdir():
                if plugin.name != "hydra_submitit_launcher":
                    (shadow / "hydra_plugins" / plugin.name).symlink_to(plugin)
        elif not (name.endswith(".pth") or name.startswith(("submitit", "hydra_submitit"))):
            (shadow / name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{shadow}",
           "DISTILL_MULTIRUN": str(tmp_path / "multirun")}
    for preset, plugin_option in (("slurm", "submitit_slurm"), ("local_array", "submitit_local")):
        proc = subprocess.run(
            [sys.executable, "-S", "-c", "import sys; from distill_cli.cli import distill_main; "
             f"sys.argv = ['distill', '-m', 'hydra/launcher={preset}', *{DIGITS!r}]; "
             "distill_main()"], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert f"Could not load 'hydra/launcher/{plugin_option}'" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_local_array_runs_at_most_n_jobs_with_cores_over_n_threads(tmp_path, compose_hydra):
    """The preset's `setup` lines, run as submitit runs them (sh, joined by &&): 3 jobs, 2 slots."""
    cfg = compose_hydra(["hydra/launcher=local_array", f"hydra.sweep.dir={tmp_path}"])
    setup = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)["setup"]
    job = 'echo "$(date +%s.%N) $(sleep 1; date +%s.%N) $OMP_NUM_THREADS $MKL_NUM_THREADS"'
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_LOCAL_JOBS"}
    procs = [subprocess.Popen(" && ".join([*setup, job]), shell=True, text=True, env=env,
                              stdout=subprocess.PIPE) for _ in range(3)]
    spans = [p.communicate(timeout=30)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert all(s[2:] == [threads, threads] for s in spans)
    starts = sorted(float(s[0]) for s in spans)
    ends = sorted(float(s[1]) for s in spans)
    assert starts[2] >= ends[0] - 0.05   # the third waited for a slot


# ------------------------------------------------------------------ real local arrays
@pytest.mark.serial
def test_local_array_sweep_and_a_finished_run_left_as_it_is(tmp_path):
    sweep = tmp_path / "sweep"
    env_home = {"DISTILL_HOME": str(tmp_path / "home")}
    distill("-m", "hydra/launcher=local_array", f"hydra.sweep.dir={sweep}", *TINY,
            "trainer.epochs=1", "teacher=mlp", "teacher.train.epochs=1", "loss=ce,kd",
            tmp_path=tmp_path, check_rc=0, env=env_home)
    summaries = {d.name: json.loads((d / "summary.json").read_text())
                 for d in sorted(sweep.iterdir()) if d.name.isdigit()}
    assert set(summaries) == {"0", "1"}
    assert {s["status"] for s in summaries.values()} == {"finished"}
    assert {s["loss"] for s in summaries.values()} == {"CrossEntropy", "KD"}
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2   # one process per job
    threads = max(1, len(os.sched_getaffinity(0)) // 2)   # 2 jobs at once: cores // 2 each
    assert all(s.get("threads", threads) == threads for s in summaries.values())

    # the same job again into its run dir (what a requeue after the end would do)
    job0 = sweep / "0"
    overrides = yaml.safe_load((job0 / ".hydra" / "overrides.yaml").read_text())
    before = snapshot(job0)
    proc = distill(*overrides, f"hydra.run.dir={job0}", "trainer.resume=if_any",
                   tmp_path=tmp_path, check_rc=0, env=env_home)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "already finished" in said and "Traceback" not in proc.stderr
    assert snapshot(job0) == before


def _job_process(sweep: Path) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"submitit.core._submit" in cmd and str(sweep).encode() in cmd:
            return int(proc.name)
    return None


@pytest.mark.serial
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process in /proc")
def test_a_requeued_local_job_continues_its_run_bit_exactly(tmp_path):
    """Pre-empt a running job the way SLURM does (USR2): submitit checkpoints it and runs it
    again; with trainer.resume=if_any it continues from last.pt and ends bit-identical to an
    uninterrupted run."""
    sweep = tmp_path / "sweep"
    job = TINY + ["teacher=none", "loss=ce", "trainer.epochs=40"]
    cores = len(os.sched_getaffinity(0))   # as many slots as cores: 1 thread, like this process
    env = {**os.environ, "WANDB_MODE": "disabled", "DISTILL_LOCAL_JOBS": str(cores)}
    parent = subprocess.Popen([DISTILL, "-m", "hydra/launcher=local_array",
                               f"hydra.sweep.dir={sweep}", *job, "trainer.resume=if_any"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = sweep / "0" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists():
        assert parent.poll() is None and time.time() < deadline, parent.communicate()[0][-3000:]
        time.sleep(0.01)
    pid = _job_process(sweep)
    os.kill(pid, signal.SIGSTOP)   # hold it mid-run, so the run cannot end before the signal
    environ = dict(kv.split("=", 1) for kv in
                   (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in kv)
    os.kill(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGCONT)
    out = parent.communicate(timeout=180)[0]
    assert parent.returncode == 0, out[-3000:]
    assert environ["OMP_NUM_THREADS"] == "1"   # the thread limit reached the job process
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log
    assert "resumed from " + str(last) in log
    full = tmp_path / "full"
    run(make_cfg(job), full, tty=False)
    a, b = weights(full), weights(sweep / "0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(full) == metrics(sweep / "0")
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.serial
def test_a_job_of_two_tasks_trains_as_two_ranks(tmp_path):
    """`hydra.launcher.tasks_per_node=2` (what the slurm preset does for DDP, here with the
    local executor): the job's 2 tasks are 2 DDP ranks (submitit's exported torchrun variables)
    and end where one process ends, within 1e-5 relative; one run dir, one summary."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "trainer.epochs=2", "loss=ce", "trainer.channels_last=false"]
    distill("-m", "hydra/launcher=local_array", "hydra.launcher.tasks_per_node=2",
            f"hydra.sweep.dir={sweep}", *args, "seed=0", tmp_path=tmp_path, check_rc=0)
    distill(*args, "seed=0", f"hydra.run.dir={tmp_path / 'one'}", tmp_path=tmp_path,
            check_rc=0)
    a, b = weights(tmp_path / "one"), weights(sweep / "0")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * float(a[k].abs().max())), k
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2
    assert len((sweep / "0" / "metrics.jsonl").read_text().splitlines()) == 2
