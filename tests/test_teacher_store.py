"""The teacher store: content keys, train-once reuse, concurrent jobs, crashes, list/prune."""
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

from distill_cli.config import build
from distill_cli.errors import UserError
from distill_cli.runs import provenance
from distill_cli.training.run import run
from distill_cli.teachers.store import Store, content_key
from distill_cli.teachers.build import teacher_description

from conftest import DIGITS, make_cfg

BIN = Path(sys.executable).parent
KD = DIGITS + ["teacher=resnet8", "student=mlp", "loss=kd", "teacher.train.epochs=2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def digits():
    return build.build_data(make_cfg(["dataset=digits"]).dataset)


def describe(cfg, data) -> dict:
    return teacher_description(cfg.teacher, data, cfg.trainer.precision)


def key_of(overrides, data):
    return content_key(describe(make_cfg(KD + overrides), data))


def test_same_inputs_same_key_and_student_side_changes_keep_it(digits):
    base = key_of([], digits)
    assert base == key_of([], digits)
    for same in (["seed=3"], ["loss=dkd"], ["student=resnet8"], ["trainer.log_every_n_steps=1"],
                 ["trainer.epochs=7"], ["optimizer.lr=0.01"], ["trainer.batch_size=32"],
                 ["scheduler=multistep"], ["trainer.channels_last=true"]):
        assert key_of(same, digits) == base, same


@pytest.mark.parametrize("change", [["teacher=resnet14"], ["teacher.seed=1"],
                                    ["teacher.train.epochs=3"], ["teacher.train.batch_size=32"],
                                    ["teacher.train.optimizer.lr=0.01"],
                                    ["teacher.train.loss.label_smoothing=0.1"],
                                    ["trainer.precision=bf16"],
                                    ["teacher.train.channels_last=true"]])
def test_any_relevant_change_gives_a_new_key(digits, change):
    assert key_of(change, digits) != key_of([], digits)


def test_the_teacher_trains_in_its_own_memory_format_not_the_students():
    from distill_cli.training.teacher_runs import teacher_run_config
    student_nhwc = teacher_run_config(make_cfg(KD + ["trainer.channels_last=true"]))
    assert student_nhwc.trainer.channels_last is False
    # nor does the student's gradient clipping (not part of the teacher's key either)
    assert teacher_run_config(make_cfg(KD + ["trainer.grad_clip=1.0"])).trainer.grad_clip is None
    teacher_nhwc = teacher_run_config(make_cfg(KD + ["teacher.train.channels_last=true"]))
    assert teacher_nhwc.trainer.channels_last is True


def test_data_identity_is_part_of_the_key():
    a = build.build_data(make_cfg(["dataset=digits"]).dataset)
    b = build.build_data(make_cfg(["dataset=digits", "dataset.limit_train=500"]).dataset)
    c = build.build_data(make_cfg(["dataset=digits", "dataset.augment.hflip=true"]).dataset)
    keys = {content_key(describe(make_cfg(KD), d)) for d in (a, b, c)}
    assert len(keys) == 3


def test_teacher_is_trained_once_then_reused(tmp_path, home):
    first = run(make_cfg(KD), tmp_path / "a", tty=False)
    assert first["teacher/source"] == "store" and first["teacher/store_hit"] is False
    entry = Store(home, "teachers").get(first["teacher/key"])
    assert entry["test_acc1"] > 50 and entry["arch"] == "resnet8"
    assert entry["description"]["train"]["epochs"] == 2
    second = run(make_cfg(KD + ["loss=dkd", "seed=1"]), tmp_path / "b", tty=False)
    assert second["teacher/key"] == first["teacher/key"] and second["teacher/store_hit"] is True
    assert Store(home, "teachers").get(first["teacher/key"])["created"] == entry["created"]
    # the stored teacher's own test accuracy is what the student runs report
    assert second["teacher/test/acc1"] == pytest.approx(entry["test_acc1"])


def _distill(args, home, tmp_path):
    env = {**os.environ, "DISTILL_HOME": str(home), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "DISTILL_OUTPUTS": str(tmp_path / "outputs")}
    return subprocess.Popen([str(BIN / "distill"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_concurrent_jobs_train_the_teacher_once(tmp_path, home):
    jobs = [_distill(KD + [f"seed={s}", "teacher.train.epochs=3"], home, tmp_path)
            for s in (0, 1)]
    outs = [j.communicate(timeout=300)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    trained = [o for o in outs if "training it first" in o]
    assert len(trained) == 1, outs
    # the other job waited on the lock — or, on a loaded machine where its start-up outlasted
    # the whole training, found the teacher already stored; never a second training
    waited = [o for o in outs if "another job is training it" in o
              or ("training it first" not in o and "reusing stored teacher" in o)]
    assert len(waited) == 1, outs
    assert len(Store(home, "teachers").entries()) == 1


# a teacher build that takes minutes: long enough to be stopped or killed in the middle
SLOW = ["dataset=fake", "dataset.train_size=20000", "dataset.shape=[1,16,16]", "logger=none",
        "teacher=mlp", "student=mlp", "loss=kd", "teacher.train.epochs=50",
        "trainer.batch_size=32"]


def _slow_build_underway(home, tmp_path) -> subprocess.Popen:
    """`distill` training the SLOW teacher into the store, a second into its first epoch."""
    job = _distill(SLOW, home, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not list((home / "teachers").glob(".tmp-*/run/summary.json")):
        time.sleep(0.2)
    time.sleep(1.0)
    return job


def test_crashed_teacher_training_leaves_no_valid_entry(tmp_path, home):
    job = _slow_build_underway(home, tmp_path)
    job.send_signal(signal.SIGKILL)  # a crash: no handler runs
    job.wait(timeout=60)
    store = Store(home, "teachers")
    assert store.entries() == [] and len(store.leftovers()) == 1
    listing = subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "list"],
                             capture_output=True, text=True)
    assert "0 teacher(s); 1 unfinished build(s)" in listing.stdout
    # the next run does not trust the leftover: it trains a complete teacher (shortened here)
    summary = run(make_cfg(SLOW + ["teacher.train.epochs=1", "trainer.epochs=1",
                                   "dataset.train_size=2000"]), tmp_path / "next", tty=False)
    assert summary["teacher/store_hit"] is False and len(store.entries()) == 1
    pruned = subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "prune"],
                            capture_output=True, text=True)
    assert pruned.returncode == 0 and ".tmp-" in pruned.stdout
    assert store.leftovers() == [] and len(store.entries()) == 1


def test_list_and_prune_entries(tmp_path, home):
    summary = run(make_cfg(KD), tmp_path / "a", tty=False)
    key = summary["teacher/key"]
    out = subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "list"],
                         capture_output=True, text=True).stdout
    assert key in out and "resnet8" in out and "digits" in out
    bad = subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "prune", "nokey"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "prune", key],
                   check=True, capture_output=True)
    assert Store(home, "teachers").entries() == []


def _stored(home, key):
    entry = Store(home, "teachers").path(key)
    weights = {n: torch.load(entry / "checkpoints" / n, weights_only=True)["model"]
               for n in ("best.pt", "last.pt")}
    rows = [{k: v for k, v in json.loads(line).items() if "images_per_s" not in k}
            for line in (entry / "metrics.jsonl").read_text().splitlines()]
    return weights, rows


def _same_weights(a, b):
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n])
               for n in a)


def test_the_teacher_follows_its_own_seed_not_the_job_that_built_it(tmp_path, monkeypatch):
    """Which job of a `seed=0,1,2` sweep happens to build the teacher must not matter: its data
    order comes from `teacher.seed`, as its initialisation does."""
    from distill_cli.training.teacher_runs import teacher_run_config
    assert teacher_run_config(make_cfg(KD + ["seed=3", "data_seed=5"])).data_seed == 0
    assert teacher_run_config(make_cfg(KD + ["teacher.seed=2"])).data_seed == 2
    built = []
    for seed in (0, 1):
        monkeypatch.setenv("DISTILL_HOME", str(tmp_path / f"home{seed}"))
        s = run(make_cfg(KD + [f"seed={seed}", "trainer.epochs=1"]), tmp_path / f"job{seed}",
                tty=False)
        assert s["teacher/store_hit"] is False
        built.append(_stored(tmp_path / f"home{seed}", s["teacher/key"]))
    assert _same_weights(built[0][0], built[1][0]) and built[0][1] == built[1][1]


def test_an_interrupted_teacher_build_is_continued_bit_exactly(tmp_path, monkeypatch, digits,
                                                                capsys):
    """The state a stopped build leaves (its run's last.pt, mid-epoch) is continued by the next
    run that needs the teacher, and the published teacher equals an uninterrupted build."""
    from distill_cli.training.run import RunInterrupted
    from distill_cli.training.teacher_runs import teacher_run_config
    home = tmp_path / "home"
    monkeypatch.setenv("DISTILL_HOME", str(home))
    cfg = make_cfg(KD + ["trainer.epochs=1"])
    key = key_of(["trainer.epochs=1"], digits)
    store = Store(home, "teachers")
    old_attempt = store.dir / f".tmp-{key}-abc123"  # as earlier versions left them: dead
    old_attempt.mkdir(parents=True)
    staging = store.staging(key)
    stopped = teacher_run_config(cfg)
    stopped.trainer.stop_at_step = 7
    with pytest.raises(RunInterrupted):
        run(stopped, staging / "run", tty=False)
    assert not old_attempt.exists() and store.leftovers() == [staging]
    capsys.readouterr()

    summary = run(cfg, tmp_path / "student", tty=False)
    out = capsys.readouterr().out
    assert "continuing its unfinished build" in out and "epoch 1, step 7" in out
    assert "training it first" not in out
    assert summary["teacher/key"] == key and summary["teacher/store_hit"] is False
    assert store.leftovers() == [] and [m["key"] for m in store.entries()] == [key]

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "ref"))
    run(cfg, tmp_path / "ref_student", tty=False)
    (w, rows), (ref_w, ref_rows) = _stored(home, key), _stored(tmp_path / "ref", key)
    assert _same_weights(w, ref_w) and rows == ref_rows


def test_a_build_with_other_settings_outside_the_key_starts_over(tmp_path, monkeypatch, digits,
                                                                  capsys):
    """Continuing a build whose recipe differs beyond the key would mix two trainings."""
    from distill_cli.training.run import RunInterrupted
    from distill_cli.training.teacher_runs import teacher_run_config
    home = tmp_path / "home"
    monkeypatch.setenv("DISTILL_HOME", str(home))
    cfg = make_cfg(KD + ["trainer.epochs=1"])
    staging = Store(home, "teachers").staging(key_of(["trainer.epochs=1"], digits))
    other = teacher_run_config(cfg)
    other.trainer.stop_at_step, other.trainer.grad_clip = 3, 123.0  # not part of the key
    with pytest.raises(RunInterrupted):
        run(other, staging / "run", tty=False)
    capsys.readouterr()
    run(cfg, tmp_path / "student", tty=False)
    out = capsys.readouterr().out
    assert "cannot be continued" in out and "trainer.grad_clip" in out
    assert "training it first" in out


def test_a_teacher_recipe_error_names_the_teacher_key_and_leaves_no_build(tmp_path, home):
    with pytest.raises(UserError) as err:
        run(make_cfg(KD + ["teacher.train.optimizer.lr=-1"]), tmp_path / "a", tty=False)
    assert err.value.key == "teacher.train.optimizer.lr"
    assert "teacher.train.optimizer.lr=0.05" in str(err.value)
    assert Store(home, "teachers").leftovers() == []


def test_ctrl_c_during_a_teacher_build_keeps_it_for_the_next_run(tmp_path, home):
    job = _slow_build_underway(home, tmp_path)
    job.send_signal(signal.SIGINT)
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 128 + signal.SIGINT, out
    assert "Run the same command again" in out and "trainer.resume=auto" not in out
    store = Store(home, "teachers")
    [build] = store.leftovers()
    assert (build / "run" / "checkpoints" / "last.pt").is_file()
    assert json.loads((build / "run" / "summary.json").read_text())["status"] == "interrupted"
    listing = subprocess.run([str(BIN / "distill-teachers"), "--root", str(home), "list"],
                             capture_output=True, text=True)
    assert "1 unfinished build(s) (the next run that needs one continues it" in listing.stdout


def test_an_entry_records_its_machine_and_reuse_elsewhere_says_so(tmp_path, home, capsys):
    """Bits hold per kind of machine (CPU ISA / vendor, CUDA device, torch): the entry records
    the kind that trained it, and reusing it on another kind says so on the reuse line."""
    args = DIGITS + ["teacher=mlp", "student=mlp", "loss=kd", "teacher.train.epochs=1",
                     "trainer.epochs=1"]
    first = run(make_cfg(args), tmp_path / "a", tty=False)
    here = provenance.machine_kind(torch.device("cpu"))
    assert torch.__version__ in here and torch.backends.cpu.get_cpu_capability() in here
    assert first["machine"] == here
    store = Store(home, "teachers")
    assert store.get(first["teacher/key"])["machine"] == here
    capsys.readouterr()
    run(make_cfg(args + ["seed=1"]), tmp_path / "b", tty=False)
    line = [o for o in capsys.readouterr().out.splitlines() if "reusing stored teacher" in o]
    assert len(line) == 1 and "another kind of machine" not in line[0]
    entry_file = store.path(first["teacher/key"]) / "entry.json"
    meta = json.loads(entry_file.read_text())
    entry_file.write_text(json.dumps({**meta, "machine": "Some CPU (AVX2), torch 2.0.0"}))
    run(make_cfg(args + ["seed=2"]), tmp_path / "c", tty=False)
    line = [o for o in capsys.readouterr().out.splitlines() if "reusing stored teacher" in o]
    assert len(line) == 1
    assert line[0].endswith("on another kind of machine: Some CPU (AVX2), torch 2.0.0)")
