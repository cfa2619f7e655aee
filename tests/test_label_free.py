"""Label-free student training (distill_cli/data/unlabeled.py): `dataset.labels=false` hides the
training labels (a -1 sentinel, so any read fails loudly), label-reading losses are refused, a
label-free loss trains to the same weights with or without labels, and `dataset.extra_unlabeled`
appends another dataset's training images."""
from __future__ import annotations

import pytest
import torch

from distill_cli.config.build import build_data
from distill_cli.data import unlabeled
from distill_cli.errors import UserError
from distill_cli.training.run import run

from conftest import DIGITS, make_cfg

EXTRA = ["+dataset@dataset.extra_unlabeled=fake", "dataset.extra_unlabeled.shape=[1,8,8]",
         "dataset.extra_unlabeled.train_size=300"]


def ssld(teacher):
    return DIGITS + ["student=mlp", "loss=ssld", "teacher=resnet8",
                     f"teacher.checkpoint={teacher}", "teacher.outputs=live"]


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_hidden_labels_are_a_sentinel_and_change_nothing_for_ssld(tmp_path, digits_teacher):
    cfg = make_cfg(ssld(digits_teacher) + ["dataset.labels=false"])
    data = build_data(cfg.dataset)
    view = unlabeled.student_view(cfg.dataset, data, build_data)
    assert (view.train.y == unlabeled.UNLABELED).all()
    assert torch.equal(view.train.x, data.train.x) and torch.equal(view.val.y, data.val.y)
    assert view.identity == data.identity   # same images: stored teacher outputs are shared
    hidden = run(cfg, tmp_path / "hidden", tty=False)
    shown = run(make_cfg(ssld(digits_teacher)), tmp_path / "shown", tty=False)
    a, b = weights(tmp_path / "hidden"), weights(tmp_path / "shown")
    assert all(torch.equal(a[k], b[k]) for k in a)   # SSLD never read the labels it had
    assert hidden["best/test/acc1"] == shown["best/test/acc1"] > 50


@pytest.mark.parametrize("extra, key", [
    (["loss=kd"], "dataset.labels"),
    (["loss.ce_weight=0.5"], "dataset.labels"),
    (["augment.mix.mixup_alpha=0.2"], "augment.mix"),
    (["eval.mia=true"], "eval.mia"),
])
def test_label_reading_setups_are_refused(tmp_path, digits_teacher, extra, key):
    with pytest.raises(UserError) as info:
        run(make_cfg(ssld(digits_teacher) + ["dataset.labels=false"] + extra), tmp_path / "r",
            tty=False)
    assert info.value.key == key, info.value.paragraph()
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_extra_unlabeled_images_join_the_training_split(tmp_path, digits_teacher):
    cfg = make_cfg(ssld(digits_teacher) + EXTRA)
    data = build_data(cfg.dataset)
    view = unlabeled.student_view(cfg.dataset, data, build_data)
    n = len(data.train)
    assert len(view.train) == n + 270          # fake's train split: 300 minus 10% val
    assert torch.equal(view.train.y[:n], data.train.y)   # labels kept (labels=true) ...
    assert (view.train.y[n:] == unlabeled.UNLABELED).all()   # ... the extra has none
    assert view.identity["extra_unlabeled"]["name"] == "fake"
    assert len(view.val) == len(data.val) and len(view.test) == len(data.test)
    summary = run(cfg, tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["best/test/acc1"] > 50
    with pytest.raises(UserError) as info:      # a labelled loss cannot use unlabeled images
        run(make_cfg(ssld(digits_teacher) + EXTRA + ["loss=kd"]), tmp_path / "kd", tty=False)
    assert info.value.key == "dataset.extra_unlabeled"


def test_extra_data_of_another_shape_is_refused(tmp_path, digits_teacher):
    with pytest.raises(UserError) as info:
        run(make_cfg(ssld(digits_teacher) + EXTRA[:1] + ["dataset.extra_unlabeled.shape=[1,28,28]"]),
            tmp_path / "r", tty=False)
    assert info.value.key == "dataset.extra_unlabeled"


def test_a_store_teacher_still_learns_from_the_labels(tmp_path):
    summary = run(make_cfg(DIGITS + ["student=mlp", "loss=ssld", "teacher=resnet8",
                                     "teacher.train.epochs=2", "dataset.labels=false"]),
                  tmp_path / "r", tty=False)
    assert summary["teacher/test/acc1"] > 60 and summary["best/test/acc1"] > 50
