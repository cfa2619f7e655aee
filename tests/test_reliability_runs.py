"""A run's life under bad input and faults (issue #18 item 2): non-finite numbers (in the config
and during training, `trainer.on_nonfinite`), wrong types, what a resume may change, the
run-dir lock, a run killed before its first checkpoint, and temp files of dead writers.

Real runs (digits, one thread), real files and real processes; the data of the non-finite
tests is digits as float signals with a few samples set to NaN, so which steps see a NaN is
known in advance from the batch order alone (`epoch_order`), independently of the engine.
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

from conftest import DIGITS, make_cfg
from distill_cli.config.build import build_data
from distill_cli.data.bundle import DataBundle, InMemorySplit, epoch_order
from distill_cli.errors import UserError
from distill_cli.io import remove_stale_tmp
from distill_cli.runs.directory import LOCK_FILE, RunDirBusy, run_dir_lock
from distill_cli.training.run import RunDiverged, RunInterrupted, run
from test_cli import DISTILL, distill

TESTS = Path(__file__).resolve().parent
# the command B
B = ["dataset=digits", "student=mlp", "trainer.epochs=1", "logger=none"]
MLP = DIGITS + ["student=mlp", "loss=ce"]
DIVERGES_AT = 6   # MLP with optimizer.lr=1e3: the loss is nan from global step 6 on (measured)


def expect_error(overrides, run_dir, key) -> UserError:
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + overrides), run_dir, tty=False)
    err = info.value
    assert err.key == key, (err.key, err.paragraph())
    assert err.fix and "\n\n" not in err.paragraph()
    return err


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if "images_per_s" not in k} for ln in lines]


# ------------------------------------------------------------------ the config, checked up front
@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=nan", "optimizer.lr"), ("optimizer.lr=inf", "optimizer.lr"),
    ("optimizer.momentum=nan", "optimizer.momentum"),
    ("optimizer.weight_decay=-inf", "optimizer.weight_decay"),
    ("trainer.grad_clip=inf", "trainer.grad_clip"),
    ("eval.pgd.step_size=nan", "eval.pgd.step_size"),
])
def test_a_nonfinite_number_anywhere_in_the_config_is_refused(tmp_path, override, key):
    err = expect_error(["loss=ce", override], tmp_path / "r", key)
    assert "finite" in err.what
    assert not (tmp_path / "r").exists()   # refused before the run dir was touched


def test_a_nonfinite_loss_option_is_refused_by_the_generic_walk(tmp_path):
    """No list of keys: a loss's own option (KD's temperature) is covered too."""
    expect_error(["loss=kd", "teacher=mlp", "loss.temperature=inf"], tmp_path / "r",
                 "loss.temperature")


@pytest.mark.parametrize("override,key,expected", [
    ("seed=abc", "seed", "integer"), ("teacher.seed=abc", "teacher.seed", "integer"),
    ("data_seed=1.5", "data_seed", "integer"), ("seed=-3", "seed", "integer"),
    ("trainer.grad_clip=abc", "trainer.grad_clip", "number"),
    ("trainer.grad_clip=0", "trainer.grad_clip", "number > 0"),
    ("trainer.checkpoint_every_n_steps=abc", "trainer.checkpoint_every_n_steps", "integer"),
    ("trainer.epochs=0.5", "trainer.epochs", "integer"),
    ("trainer.batch_size=0.5", "trainer.batch_size", "integer"),
    ("trainer.eval_batch_size=abc", "trainer.eval_batch_size", "integer"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps", "integer >= 1"),
    ("trainer.stop_at_step=abc", "trainer.stop_at_step", "integer"),
    ("teacher.train.epochs=2.5", "teacher.train.epochs", "integer"),
    ("teachers=[{arch: mlp, seed: x}]", "teachers[0].seed", "integer"),
    ("trainer.compile=abc", "trainer.compile", "true or false"),
    ("trainer.on_nonfinite=sometimes", "trainer.on_nonfinite", "skip"),
])
def test_a_wrongly_typed_value_names_its_key_and_type(tmp_path, override, key, expected):
    err = expect_error(["loss=ce", override], tmp_path / "r", key)
    assert expected in err.paragraph().replace("\n", " ")
    assert not (tmp_path / "r").exists()


def test_cli_refuses_bad_numbers_with_one_paragraph_and_exit_2(tmp_path):
    for override, key in (("optimizer.lr=nan", "optimizer.lr"), ("seed=abc", "seed"),
                          ("trainer.batch_size=0.5", "trainer.batch_size")):
        proc = distill(*B, override, tmp_path=tmp_path, check_rc=2)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n\n") == 0
        assert f"Config key: `{key}`" in " ".join(proc.stderr.split())


# ------------------------------------------------------------------ divergence (policy stop)
def test_a_diverging_run_stops_at_its_first_nonfinite_step(tmp_path):
    base = MLP + ["optimizer.lr=1e3", "trainer.checkpoint_every_n_steps=1"]
    with pytest.raises(RunDiverged) as info:
        run(make_cfg(base), tmp_path / "d", tty=False)
    err = info.value
    assert err.exit_code == 4 and err.step == DIVERGES_AT and err.key == "optimizer.lr"
    assert "trainer.on_nonfinite=skip" in err.fix
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["nonfinite/step"] == DIVERGES_AT
    # no checkpoint from that step on: last.pt is the state after step DIVERGES_AT - 1
    last = last_state(tmp_path / "d")
    assert last["state"]["step"] == DIVERGES_AT - 1 and all_finite(last["model"])
    assert not (tmp_path / "d" / "checkpoints" / "best.pt").exists()
    # independently: stopping one step earlier meets no non-finite loss at all
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + [f"trainer.stop_at_step={DIVERGES_AT - 1}"]), tmp_path / "e",
            tty=False)
    assert last_state(tmp_path / "e")["state"]["step"] == DIVERGES_AT - 1


def test_cli_diverged_run_exits_4_with_one_paragraph(tmp_path):
    run_dir = tmp_path / "d"
    proc = distill(*B, "optimizer.lr=1e3", f"hydra.run.dir={run_dir}", tmp_path=tmp_path,
                   check_rc=4)
    assert proc.stderr.startswith("error: Training diverged") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n\n") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["nonfinite/step"] >= 1


# ------------------------------------------------------------------ poisoned data: stop and skip
def float_digits(poison: list[int]) -> DataBundle:
    """digits as float32 [N, 1, 64] signals (the runner reads float signals as they are);
    the training samples at `poison` are all NaN."""
    d = build_data(make_cfg(DIGITS).dataset)

    def signals(split, nan=()):
        x = split.x.float().reshape(len(split), 1, 64)
        x[list(nan)] = float("nan")
        return InMemorySplit(x, split.y, mean=(0.3053 * 255,), std=(0.3759 * 255,))

    return DataBundle(name="digits-signals", train=signals(d.train, poison),
                      val=signals(d.val), test=signals(d.test), num_classes=10,
                      input_shape=(1, 64), identity={"name": "digits-signals"})


def steps_seeing(poison: list[int], n: int, batch: int, epochs: int, seed: int = 0) -> list[int]:
    """The 1-based global steps whose batch holds a poisoned sample: the batch order alone."""
    steps_per_epoch = n // batch
    out = []
    for epoch in range(1, epochs + 1):
        order = epoch_order(n, seed, epoch)[:steps_per_epoch * batch].view(steps_per_epoch, -1)
        out += [(epoch - 1) * steps_per_epoch + k + 1 for k in range(steps_per_epoch)
                if set(order[k].tolist()) & set(poison)]
    return out


N_TRAIN, BATCH = 1293, 64
# two samples of epoch 1's batches 4 and 12 (0-based 3 and 11)
POISON = [int(epoch_order(N_TRAIN, 0, 1)[3 * BATCH + 5]),
          int(epoch_order(N_TRAIN, 0, 1)[11 * BATCH])]
SIGNALS = DIGITS + ["loss=ce", "student=cnn1d"]   # cnn1d: BatchNorm statistics change in forward


def test_poisoned_data_stops_the_run_at_the_first_step_that_sees_it(tmp_path):
    bad = steps_seeing(POISON, N_TRAIN, BATCH, epochs=2)
    assert bad[:2] == [4, 12]
    with pytest.raises(RunDiverged) as info:
        run(make_cfg(SIGNALS), tmp_path / "r", tty=False, data=float_digits(POISON))
    assert info.value.step == bad[0]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["nonfinite/step"] == bad[0]


def test_skip_leaves_out_exactly_the_steps_that_see_poisoned_data(tmp_path):
    bad = steps_seeing(POISON, N_TRAIN, BATCH, epochs=2)
    summary = run(make_cfg(SIGNALS + ["trainer.on_nonfinite=skip"]), tmp_path / "r", tty=False,
                  data=float_digits(POISON))
    assert summary["status"] == "finished" and summary["nonfinite/skipped_steps"] == len(bad)
    per_epoch = [sum(1 for s in bad if (s - 1) // 20 == e) for e in range(2)]
    assert [r["train/skipped_steps"] for r in rows(tmp_path / "r")] == per_epoch
    assert all(r["train/loss"] == r["train/loss"] for r in rows(tmp_path / "r"))   # not nan
    last = last_state(tmp_path / "r")
    assert all_finite(last["model"]) and last["state"]["skipped_steps"] == len(bad)
    assert summary["last/test/acc1"] > 50


def test_a_skipped_step_changes_nothing(tmp_path):
    """Stopped right before and right after the skipped step 4: the same weights, BatchNorm
    statistics, optimizer and scheduler state."""
    base = SIGNALS + ["trainer.on_nonfinite=skip", "scheduler=cosine"]
    states = []
    for stop in (3, 4):
        with pytest.raises(RunInterrupted):
            run(make_cfg(base + [f"trainer.stop_at_step={stop}"]), tmp_path / str(stop),
                tty=False, data=float_digits(POISON))
        states.append(last_state(tmp_path / str(stop)))
    before, after = states
    assert after["state"]["skipped_steps"] == 1 and before["state"]["skipped_steps"] == 0
    for k in before["model"]:   # includes running_mean / running_var / num_batches_tracked
        assert torch.equal(before["model"][k], after["model"][k]), k
    assert before["scheduler"] == after["scheduler"]
    for a, b in zip(before["optimizer"]["state"].values(), after["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# ------------------------------------------------------------------ under torchrun: one verdict
RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from conftest import make_cfg
from distill_cli.training.run import RunDiverged, run
from test_reliability_runs import SIGNALS, float_digits

rank = int(os.environ["RANK"])
out = {{"rank": rank}}
try:
    out["status"] = run(make_cfg(SIGNALS + {extra!r}), {run_dir!r}, tty=False,
                        data=float_digits({poison!r}))["status"]
except RunDiverged as err:
    out.update(status="diverged", step=err.step)
open(os.path.join({out!r}, f"rank{{rank}}.json"), "w").write(json.dumps(out))
"""


def torchrun_ranks(tmp_path: Path, name: str, extra: list[str], poison: list[int]) -> list[dict]:
    script = tmp_path / f"{name}.py"
    script.write_text(RANK_SCRIPT.format(tests=str(TESTS), extra=extra, poison=poison,
                                         run_dir=str(tmp_path / name), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                    "--nproc_per_node=2", str(script)], env=env, cwd=tmp_path, timeout=240,
                   capture_output=True, text=True, check=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.serial
def test_ranks_agree_on_a_nan_only_one_rank_sees(tmp_path):
    """Sample in the second half of global batch 4: only rank 1's local loss is nan there
    (rank 0's turns nan a step later, through the averaged gradients). Both ranks stop at step
    4 under `stop`; under `skip` both skip exactly the poisoned steps and finish."""
    order = epoch_order(N_TRAIN, 0, 1)
    poison = [int(order[3 * BATCH + BATCH - 1])]   # rank 1's slice of batch 4
    bad = steps_seeing(poison, N_TRAIN, BATCH, epochs=2)
    assert bad[0] == 4
    stopped = torchrun_ranks(tmp_path, "stop", [], poison)
    assert [r["status"] for r in stopped] == ["diverged", "diverged"]
    assert [r["step"] for r in stopped] == [4, 4]
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["nonfinite/step"] == 4
    for f in ("rank0.json", "rank1.json"):
        (tmp_path / f).unlink()
    skipped = torchrun_ranks(tmp_path, "skip", ["trainer.on_nonfinite=skip"], poison)
    assert [r["status"] for r in skipped] == ["finished", "finished"]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["nonfinite/skipped_steps"] == len(bad) and summary["world_size"] == 2
    assert all_finite(last_state(tmp_path / "skip")["model"])


# ------------------------------------------------------------------ what a resume may change
def test_resume_with_another_epoch_count_is_refused_and_a_fork_says_what_it_is(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(RunInterrupted):
        run(make_cfg(MLP + ["trainer.stop_at_step=25"]), run_dir, tty=False)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    err = expect_error(["student=mlp", "loss=ce", "trainer.epochs=3", "trainer.resume=auto"],
                       run_dir, "trainer.resume")
    assert "trainer.epochs: 2 → 3" in err.what and "fork" in err.fix
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    # the documented way to train it longer: a fork, which records what it continued
    fork = tmp_path / "fork"
    summary = run(make_cfg(MLP + ["trainer.epochs=3",
                                  f"trainer.resume={run_dir}/checkpoints/last.pt"]), fork,
                  tty=False)
    record = {"checkpoint": f"{run_dir}/checkpoints/last.pt", "epoch": 1, "step": 25,
              "trainer.epochs": 2}
    assert summary["forked_from"] == record and summary["epochs"] == 3
    assert last_state(fork)["forked_from"] == record
    # the original run still finishes as started
    run(make_cfg(MLP + ["trainer.resume=auto"]), run_dir, tty=False)


def test_a_fork_that_never_beats_its_sources_best_still_finishes(tmp_path):
    """The fork continues the source's best-so-far, so its best.pt starts as the source's: a
    fork that trains no further epoch (or none better) still evaluates a best.pt."""
    first = tmp_path / "first"
    done = run(make_cfg(MLP + ["trainer.epochs=1"]), first, tty=False)
    fork = tmp_path / "fork"
    summary = run(make_cfg(MLP + ["trainer.epochs=1",
                                  f"trainer.resume={first}/checkpoints/last.pt"]), fork,
                  tty=False)
    assert summary["status"] == "finished" and summary["best/epoch"] == 1
    assert summary["best/test/acc1"] == done["best/test/acc1"]
    assert (fork / "checkpoints" / "best.pt").read_bytes() == (
        first / "checkpoints" / "best.pt").read_bytes()


def test_a_refused_resume_says_how_many_more_differences_there_are(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(RunInterrupted):
        run(make_cfg(MLP + ["trainer.stop_at_step=2"]), run_dir, tty=False)
    changed = ["optimizer.lr=0.1", "optimizer.momentum=0.5", "optimizer.weight_decay=0.1",
               "seed=5", "trainer.batch_size=32", "trainer.epochs=4", "student.hidden=[64]",
               "student.dropout=0.1"]
    err = expect_error(["student=mlp", "loss=ce", *changed, "trainer.resume=auto"], run_dir,
                       "trainer.resume")
    # seed=5 also moves data_seed: 9 differences, 6 shown
    assert err.what.count(" → ") == 6 and "and 3 more" in err.what


# ------------------------------------------------------------------ the run-dir lock
HOLDER = """
import sys, time
from distill_cli.runs.directory import run_dir_lock
with run_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_is_refused_naming_the_holders_pid(tmp_path):
    run_dir = tmp_path / "r"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunDirBusy) as info:
            run(make_cfg(MLP + ["trainer.epochs=1"]), run_dir, tty=False)
        assert f"process {holder.pid}" in info.value.what and info.value.exit_code == 2
        assert not (run_dir / "summary.json").exists()
        # the guard's check (check_run_dir, before Hydra writes) refuses it the same way
        proc = distill(*B, f"hydra.run.dir={run_dir}", tmp_path=tmp_path, check_rc=2)
        assert f"process {holder.pid}" in " ".join(proc.stderr.split())
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the dir is usable, and clean after the run
    assert (run_dir / LOCK_FILE).exists()
    assert run(make_cfg(MLP + ["trainer.epochs=1"]), run_dir, tty=False)["status"] == "finished"
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_is_reentrant_within_a_process_and_gone_after(tmp_path):
    with run_dir_lock(tmp_path / "r"):
        with run_dir_lock(tmp_path / "r"):
            assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "r").exists()   # created for the lock alone: removed with it


def test_two_launches_into_one_run_dir_at_once_run_once(tmp_path):
    run_dir = tmp_path / "same"
    args = [*B, "trainer.epochs=3", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "DISTILL_OUTPUTS": str(tmp_path / "o")}
    procs = [subprocess.Popen([DISTILL, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "is in use" in refused or "already holds a run" in refused
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


# ------------------------------------------------------------------ run dirs a crash left behind
def test_unreadable_summary_without_a_checkpoint_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "runn')   # cut mid-write by hand
    for extra in ([], ["trainer.resume=auto"], ["trainer.resume=if_any"]):
        err = expect_error(["student=mlp", "loss=ce", *extra], run_dir, "hydra.run.dir")
        assert "cannot be read" in err.what
    assert (run_dir / "summary.json").read_text() == '{"status": "runn'
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]


def test_a_run_stopped_before_its_first_checkpoint_is_rerun_with_resume_auto(tmp_path):
    """Both messages point the same way: a plain launch says pass trainer.resume=auto, and
    that starts the run over from step 0 — ending where a clean run ends."""
    clean = tmp_path / "clean"
    run(make_cfg(MLP), clean, tty=False)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
    (run_dir / "metrics.jsonl").write_text("")
    err = expect_error(["student=mlp", "loss=ce"], run_dir, "hydra.run.dir")
    assert "before its first checkpoint" in err.what and "trainer.resume=auto" in err.fix
    run(make_cfg(MLP + ["trainer.resume=auto"]), run_dir, tty=False)
    a, b = last_state(clean)["model"], last_state(run_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(run_dir) == rows(clean)


def test_cli_run_killed_before_its_first_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "killed"
    args = ["dataset=fake", "dataset.train_size=20000", "dataset.shape=[1,16,16]",
            "logger=none", "student=mlp", "loss=ce", "trainer.epochs=1",
            "trainer.batch_size=4", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "DISTILL_OUTPUTS": str(tmp_path / "o"), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([DISTILL, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "summary.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "last.pt").exists()   # 5000 steps: far from it
    refused = distill(*args, tmp_path=tmp_path, check_rc=2)
    assert "trainer.resume=auto" in " ".join(refused.stderr.split())
    distill(*args, "trainer.resume=auto", tmp_path=tmp_path, check_rc=0)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not (run_dir / LOCK_FILE).exists()


def test_the_epoch_line_a_kill_lost_comes_back_from_the_checkpoint(tmp_path):
    """last.pt at the end of an epoch is written before that epoch's metrics line: a run
    killed in between gets the line back on resume."""
    full = tmp_path / "full"
    run(make_cfg(MLP), full, tty=False)
    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(MLP + ["trainer.stop_at_step=25"]), parted, tty=False)
    (parted / "metrics.jsonl").write_text("")   # as if killed before the line was appended
    run(make_cfg(MLP + ["trainer.resume=auto"]), parted, tty=False)
    assert rows(parted) == rows(full)


# ------------------------------------------------------------------ temp files of dead writers
WRITER = """
import sys, time
from pathlib import Path
from distill_cli.io import atomic_write_bytes
def slow(fh):
    fh.write(b"partial")
    fh.flush()
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    fh.write(b" and the rest")
atomic_write_bytes(Path(sys.argv[1]), slow)
"""


def start_writer(target: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_stale_tmp_files_of_dead_writers_go_and_a_live_writers_stays(tmp_path):
    dead = start_writer(tmp_path / "a.json", 60)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    live = start_writer(tmp_path / "b.json", 3)
    foreign = tmp_path / ".c.json~elsewhere-1~1~abc.tmp"   # another machine's writer
    legacy = tmp_path / ".d.json.x1y2.tmp"                 # named before writers were recorded
    for p in (foreign, legacy):
        p.write_bytes(b"?")
    tmps = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert len(tmps) == 4
    removed = remove_stale_tmp(tmp_path)
    assert [p.name for p in removed] == [n for n in tmps if n.startswith(".a.json~")]
    assert live.wait(timeout=30) == 0   # its temp file was left alone: the write completed
    assert (tmp_path / "b.json").read_bytes() == b"partial and the rest"
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([foreign.name, legacy.name])


def test_a_run_starts_by_removing_what_killed_writers_left_in_its_dir(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(RunInterrupted):
        run(make_cfg(MLP + ["trainer.stop_at_step=3"]), run_dir, tty=False)
    dead = start_writer(run_dir / "checkpoints" / "last.pt", 60)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert len(list((run_dir / "checkpoints").glob(".last.pt~*.tmp"))) == 1
    run(make_cfg(MLP + ["trainer.resume=auto"]), run_dir, tty=False)
    assert list(run_dir.rglob("*.tmp")) == []
