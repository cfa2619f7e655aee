"""Every recipe composes, pins what a reproducible experiment needs, and builds."""
from __future__ import annotations


from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.data.fake import build as fake_data
from distill_cli.losses.base import Objective
from distill_cli.teachers.pool import entry_config

from conftest import make_cfg

RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))
# synthetic stand-ins of the recipes' datasets (same shape and classes), except MNIST-1D which
# is generated locally anyway
SHAPES = {"cifar.build_cifar100": ([3, 32, 32], 100), "imagefolder.build": ([3, 224, 224], 1000),
          "fashion_mnist.build": ([1, 28, 28], 10)}


def test_the_promised_recipes_exist():
    assert {"quickstart", "fmnist_bench", "mnist1d_cnn_to_mlp", "imagenet_r34_r18_kd",
            "imagenet_r34_r18_dkd"} <= set(RECIPES)
    cifar = [r for r in RECIPES if r.startswith("cifar100_")]
    assert len(cifar) == 16  # 8 teacher-student pairs x {KD, DKD}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_builds(recipe):
    cfg = make_cfg([f"recipe={recipe}"])
    text = (Path(CONF_DIR) / "recipe" / f"{recipe}.yaml").read_text()
    assert "Source:" in text, "every recipe names its source"
    # pinned: teacher, student, loss, dataset, optimizer, scheduler, epochs and batch size
    for line in ("override /teacher", "override /student", "override /loss",
                 "override /dataset", "override /optimizer", "override /scheduler"):
        assert line in text, line
    assert "epochs:" in text and "batch_size:" in text
    resolved = OmegaConf.to_container(cfg, resolve=True)
    objective = build.build_objective(cfg.loss)
    assert isinstance(objective, Objective) and objective.needs_teacher
    # one teacher, or a pool (`teachers`) for multi-teacher objectives
    pool = [entry_config(cfg, e, i).teacher for i, e in enumerate(cfg.teachers)]
    assert bool(pool) == objective.multiple_teachers
    assert pool or resolved["teacher"]["arch"] is not None
    if cfg.dataset._target_.endswith("mnist1d.build"):
        data = build.build_data(cfg.dataset)
    else:
        shape, classes = next(v for k, v in SHAPES.items() if cfg.dataset._target_.endswith(k))
        data = fake_data(shape=shape, num_classes=classes, train_size=8, test_size=4)
    student = build.build_model(cfg.student, "student", data)
    params = list(student.parameters())
    optimizer = build.build_optimizer(cfg.optimizer, params)
    build.build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=10,
                          epochs=int(cfg.trainer.epochs))
    x = torch.zeros(2, *data.input_shape)
    for node in pool or [cfg.teacher]:
        node = OmegaConf.merge(node, {"weights": None} if "weights" in node else {})
        teacher = build.build_model(node, "teacher", data)
        assert student(x).shape == teacher(x).shape == (2, data.num_classes)


@pytest.mark.parametrize("recipe,pair,beta", [("cifar100_r32x4_r8x4_dkd", ("resnet32x4", "resnet8x4"), 8),
                                              ("cifar100_r56_r20_dkd", ("resnet56", "resnet20"), 2),
                                              ("cifar100_vgg13_mv2_dkd", ("vgg13", "mobilenetv2"), 6)])
def test_cifar_dkd_recipes_follow_the_protocol(recipe, pair, beta):
    cfg = make_cfg([f"recipe={recipe}"])
    assert (cfg.teacher.arch, cfg.student.arch) == pair
    assert cfg.loss.beta == beta and cfg.loss.warmup == 20 and cfg.loss.temperature == 4
    assert cfg.trainer.epochs == 240 and cfg.trainer.batch_size == 64
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    assert cfg.optimizer.weight_decay == 5e-4
    assert cfg.optimizer.lr == (0.01 if pair[1] == "mobilenetv2" else 0.05)


@pytest.mark.parametrize("recipe", ["quickstart", "fmnist_bench"])
def test_a_recipe_sweep_shares_one_teacher(recipe):
    from distill_cli.teachers.resolve import teacher_description
    fake = fake_data(shape=[1, 28, 28], num_classes=10, train_size=8, test_size=4)
    keys = {str(teacher_description(make_cfg([f"recipe={recipe}", f"loss={loss}",
                                              f"seed={seed}"]), fake))
            for loss in ("ce", "kd", "dkd", "pld", "dist") for seed in (0, 1)}
    assert len(keys) == 1


def test_command_line_beats_the_recipe():
    cfg = make_cfg(["recipe=quickstart", "loss=dkd", "trainer.epochs=2"])
    assert cfg.loss._target_.endswith("DKD") and cfg.trainer.epochs == 2
    assert cfg.loss.warmup == 2  # the recipe's per-method option reaches DKD


def test_mtard_recipe_pairs_the_fmnist_bench_teacher_with_a_robust_one():
    from distill_cli.teachers.store import content_key
    from distill_cli.teachers.resolve import teacher_description

    cfg = make_cfg(["recipe=fmnist_mtard"])
    bench = make_cfg(["recipe=fmnist_bench"])
    data = fake_data(shape=(1, 28, 28), num_classes=10, train_size=8, test_size=4)
    clean, robust = (entry_config(cfg, e, i) for i, e in enumerate(cfg.teachers))
    key = lambda c: content_key(teacher_description(c, data))   # noqa: E731
    assert key(clean) == key(bench)            # the clean teacher IS fmnist_bench's teacher
    assert robust.teacher.train.loss._target_.endswith("AdversarialCE") and key(robust) != key(clean)
    assert cfg.eval.pgd.steps == 20 and cfg.loss._target_.endswith("MTARD")
