"""Every mistake a user can make gets a UserError naming the key, before training starts,
and nothing already on disk is touched."""
from __future__ import annotations

import pytest
import torch

from distill_cli.errors import UserError
from distill_cli.training.run import RunInterrupted, run

from conftest import DIGITS, make_cfg


def expect_error(overrides, run_dir, key_part):
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + overrides), run_dir, tty=False)
    err = info.value
    assert err.key and key_part in err.key, (err.key, err.paragraph())
    assert err.fix, "every user error says how to fix it"
    assert "\n\n" not in err.paragraph()
    return err


def test_missing_teacher_checkpoint(tmp_path):
    err = expect_error(["teacher=resnet8", f"teacher.checkpoint={tmp_path}/nope.pt",
                        "loss=kd"], tmp_path / "r", "teacher.checkpoint")
    assert "does not exist" in err.what
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_corrupt_teacher_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    expect_error(["teacher=resnet8", f"teacher.checkpoint={bad}", "loss=kd"], tmp_path / "r",
                 "teacher.checkpoint")


def test_truncated_teacher_checkpoint(tmp_path, digits_teacher):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(digits_teacher.read_bytes()[:5000])
    expect_error(["teacher=resnet8", f"teacher.checkpoint={cut}", "loss=kd"], tmp_path / "r",
                 "teacher.checkpoint")


def test_teacher_checkpoint_of_another_architecture(tmp_path, digits_teacher):
    err = expect_error(["teacher=resnet20", f"teacher.checkpoint={digits_teacher}", "loss=kd"],
                       tmp_path / "r", "teacher")
    assert "resnet8" in err.what and "resnet20" in err.what


def test_teacher_checkpoint_with_another_class_count(tmp_path, digits_teacher):
    err = expect_error(["dataset=fake", "dataset.num_classes=7", "dataset.shape=[1,8,8]",
                        "teacher=resnet8", f"teacher.checkpoint={digits_teacher}", "loss=kd"],
                       tmp_path / "r", "teacher.checkpoint")
    assert "10" in err.what and "7" in err.what


def test_loss_that_needs_a_teacher_without_one(tmp_path):
    expect_error(["teacher=none", "loss=kd"], tmp_path / "r", "teacher")


@pytest.mark.parametrize("override,key", [("trainer.epochs=0", "trainer.epochs"),
                                          ("trainer.batch_size=-4", "trainer.batch_size"),
                                          ("optimizer.lr=0", "optimizer.lr")])
def test_non_positive_values(tmp_path, override, key):
    expect_error([override, "loss=ce"], tmp_path / "r", key)


def test_resume_with_nothing_to_resume(tmp_path):
    expect_error(["loss=ce", "trainer.resume=auto"], tmp_path / "r", "trainer.resume")
    expect_error(["loss=ce", f"trainer.resume={tmp_path}/missing.pt"], tmp_path / "r2",
                 "trainer.resume")


def test_finished_run_dir_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "r"
    run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=1"]), run_dir, tty=False)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    expect_error(["student=mlp", "loss=ce", "trainer.epochs=1"], run_dir, "hydra.run.dir")
    expect_error(["student=mlp", "loss=ce", "trainer.resume=auto"], run_dir, "trainer.resume")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_with_different_settings_is_refused(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(RunInterrupted):
        run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.stop_at_step=3"]), run_dir,
            tty=False)
    err = expect_error(["student=mlp", "loss=ce", "optimizer.lr=0.2", "trainer.resume=auto"],
                       run_dir, "trainer.resume")
    assert "optimizer.lr" in err.what
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 3


def test_imagefolder_with_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(["dataset=imagefolder", f"dataset.root={tmp_path}/empty", "loss=ce"],
                 tmp_path / "r", "dataset.root")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist"])
def test_dataset_absent_and_not_downloadable(tmp_path, name):
    expect_error([f"dataset={name}", f"dataset.root={tmp_path}/nothing", "dataset.download=false",
                  "loss=ce"], tmp_path / "r", "dataset")


def test_config_target_outside_the_allow_list(tmp_path):
    err = expect_error(["loss=ce", "loss._target_=os.system"], tmp_path / "r", "loss._target_")
    assert "os.system" in err.what


def test_option_of_another_optimizer_left_by_a_recipe(tmp_path):
    """A recipe's SGD `nesterov` under optimizer=adamw: the key to delete is named."""
    err = expect_error(["loss=ce", "optimizer=adamw", "+optimizer.nesterov=true"],
                       tmp_path / "r", "optimizer.nesterov")
    assert "'~optimizer.nesterov'" in err.fix
    assert not (tmp_path / "r" / "checkpoints").exists()
