"""Issue #18 (2): empty, truncated and hand-made checkpoints, and checkpoints trained on another
input shape, are user errors (exit 2, one paragraph naming the key and the file, how to fix it)
— never a traceback, never a silent restart — and nothing on disk changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_cli.errors import UserError
from distill_cli.runs import checkpoint
from distill_cli.training.run import RunInterrupted, run

from conftest import DIGITS, make_cfg
from test_cli import distill, refused, snapshot

B = ["dataset=digits", "student=mlp", "trainer.epochs=1", "logger=none",
     "trainer.channels_last=false"]
KD = B + ["teacher=mlp", "loss=kd"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch digits MLP run; its best.pt is a complete checkpoint."""
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=1"]), run_dir, tty=False)
    return run_dir


def hand_made(src: Path, dst: Path, change) -> Path:
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _drop(key):
    return lambda c: c.pop(key)


MALFORMED = {
    "model_config_list": (_set("model_config", [1, 2]), "`model_config` is a list"),
    "data_list": (_set("data", [1, 2]), "`data` is a list"),
    "model_string": (_set("model", "weights"), "`model` is a str"),
    "model_of_numbers": (lambda c: c.__setitem__("model", {"w": 1.0}), "not a state dict"),
    "no_config": (_drop("config"), "lacks 'config'"),
    "no_model": (_drop("model"), "lacks 'model'"),
    "no_arch": (lambda c: c["model_config"].pop("arch"), "names no `arch`"),
    "no_input_shape": (lambda c: c["data"].pop("input_shape"), "`data.input_shape` is None"),
    "classes_string": (lambda c: c["data"].__setitem__("num_classes", "10"),
                       "`data.num_classes` is '10'"),
}


# ------------------------------------------------------------------ teacher.checkpoint

def test_empty_teacher_checkpoint_is_a_user_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    msg = refused(KD + [f"teacher.checkpoint={empty}"], tmp_path, "teacher.checkpoint",
                  tmp_path)
    assert str(empty) in msg and "empty(0bytes)" in msg
    assert "dropteacher.checkpoint" in msg


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_hand_made_teacher_checkpoints_are_user_errors(tmp_path, finished, case):
    change, said = MALFORMED[case]
    bad = hand_made(finished / "checkpoints" / "best.pt", tmp_path / f"{case}.pt", change)
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["teacher=mlp", "loss=kd", "student=mlp",
                               f"teacher.checkpoint={bad}"]), tmp_path / "r", tty=False)
    err = info.value
    assert err.key == "teacher.checkpoint" and str(bad) in err.what and said in err.what
    assert err.fix and "Traceback" not in err.paragraph()
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_teacher_trained_on_another_input_size_is_refused(tmp_path, digits_teacher):
    """The resnet8 teacher of digits (1x8x8) runs on 1x16x16 images (global pooling) and would
    teach at chance level: refused, naming both shapes."""
    other = ["dataset=fake", "dataset.shape=[1,16,16]", "dataset.num_classes=10",
             "dataset.train_size=200", "student=mlp", "trainer.epochs=1", "logger=none",
             "teacher=resnet8", "loss=kd", f"teacher.checkpoint={digits_teacher}"]
    msg = refused(other, tmp_path, "teacher.checkpoint", digits_teacher.parent)
    assert "[1,8,8]" in msg and "[1,16,16]" in msg


def test_same_shape_and_classes_is_still_accepted(tmp_path, digits_teacher):
    """The check is not over-eager: another dataset of the same shape and classes is fine."""
    summary = run(make_cfg(DIGITS + ["dataset=fake", "dataset.shape=[1,8,8]",
                                     "dataset.num_classes=10", "dataset.train_size=200",
                                     "student=mlp", "trainer.epochs=1", "teacher=resnet8",
                                     "loss=kd", f"teacher.checkpoint={digits_teacher}"]),
                  tmp_path / "r", tty=False)
    assert summary["status"] == "finished"


def test_a_teacher_checkpoint_with_nan_weights_is_refused(tmp_path, finished):
    def poison(c):
        name = next(iter(c["model"]))
        c["model"][name] = torch.full_like(c["model"][name], float("nan"))

    bad = hand_made(finished / "checkpoints" / "best.pt", tmp_path / "nan.pt", poison)
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["teacher=mlp", "loss=kd", "student=mlp",
                               f"teacher.checkpoint={bad}"]), tmp_path / "r", tty=False)
    assert info.value.key == "teacher.checkpoint" and "non-finite" in info.value.what


# ------------------------------------------------------------------ trainer.resume

def test_resume_from_an_empty_file_is_a_user_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.touch()
    msg = refused(B + [f"trainer.resume={empty}"], tmp_path, "trainer.resume", tmp_path)
    assert str(empty) in msg and "empty(0bytes)" in msg


@pytest.mark.parametrize("case", ["no_config", "model_config_list", "no_optimizer", "no_state",
                                  "state_list", "rng_string", "epoch_string"])
def test_resume_from_a_hand_made_checkpoint_is_a_user_error(tmp_path, finished, case):
    changes = {**{k: v[0] for k, v in MALFORMED.items()},
               "no_optimizer": _drop("optimizer"), "no_state": _drop("state"),
               "state_list": _set("state", [0, 1]), "rng_string": _set("rng", "seed"),
               "epoch_string": lambda c: c["state"].__setitem__("epoch", "1")}
    bad = hand_made(finished / "checkpoints" / "last.pt", tmp_path / f"{case}.pt", changes[case])
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=2",
                               f"trainer.resume={bad}"]), tmp_path / "r", tty=False)
    assert info.value.key == "trainer.resume" and str(bad) in info.value.what
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_emptied_last_pt_under_resume_auto_says_what_to_do(tmp_path):
    """Not a silent restart: the run dir is left as it is and the message offers the run's intact
    best.pt — and following that advice works."""
    run_dir = tmp_path / "run"
    args = DIGITS + ["student=mlp", "loss=ce"]   # 2 epochs of 20 steps
    with pytest.raises(RunInterrupted):   # stopped in epoch 2: best.pt (epoch 1) + last.pt
        run(make_cfg(args + ["trainer.stop_at_step=25"]), run_dir, tty=False)
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    last.write_bytes(b"")
    before = snapshot(run_dir)
    proc = distill(*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    msg = "".join(proc.stderr.split())   # errors.py wraps long paths at their hyphens
    assert "`trainer.resume`" in msg and str(last) in msg and "empty" in msg
    assert f"trainer.resume={best}" in msg and "hydra.run.dir=<newdir>" in msg
    after = snapshot(run_dir)   # every file as it was; Hydra's job log may be added
    assert {k: after[k] for k in before} == before
    assert {Path(k).name for k in set(after) - set(before)} <= {"cli.log"}
    forked = run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=2",
                                    f"trainer.resume={best}"]), tmp_path / "fork", tty=False)
    assert forked["status"] == "finished"


def test_emptied_last_pt_without_a_good_best_pt_says_start_over(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted):   # stopped before any epoch ended: no best.pt
        run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.stop_at_step=3"]), run_dir,
            tty=False)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.resume=auto"]), run_dir,
            tty=False)
    assert info.value.key == "trainer.resume" and "Start over in a new run dir" in info.value.fix


# ------------------------------------------------------------------ the check itself

def test_a_real_checkpoint_passes_the_structure_check(finished):
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.load(finished / "checkpoints" / name, "trainer.resume")
        assert checkpoint.structure_problem(ckpt, resume=True) is None


def test_a_directory_a_list_or_a_truncated_file_is_named(tmp_path, finished):
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(UserError) as info:
        checkpoint.load(listed, "teacher.checkpoint")
    assert "holds a list" in info.value.what and str(listed) in info.value.what
    with pytest.raises(UserError) as info:
        checkpoint.load(tmp_path, "teacher.checkpoint")
    assert "is a directory" in info.value.what
    cut = tmp_path / "cut.pt"
    cut.write_bytes((finished / "checkpoints" / "best.pt").read_bytes()[:3000])
    with pytest.raises(UserError) as info:
        checkpoint.load(cut, "teacher.checkpoint")
    assert "cannot be read" in info.value.what and str(cut) in info.value.what
