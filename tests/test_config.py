"""Compose and instantiate every option of every config group through build.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.models import create

from conftest import make_cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_teacher_and_student_share_one_zoo():
    assert options("teacher") == options("student")
    assert {"resnet8", "resnet32x4", "wrn_40_2", "vgg13", "mobilenetv2", "shufflenetv1",
            "shufflenetv2", "mlp", "cnn1d", "tv", "none"} <= set(options("student"))


def test_defaults_compose():
    cfg = make_cfg([])
    assert cfg.dataset._target_.endswith("fashion_mnist.build")
    assert cfg.teacher.arch is None and cfg.teacher.checkpoint is None
    assert cfg.seed == 0 and cfg.trainer.resume is None


@pytest.fixture(scope="module")
def fake_data():
    return build.build_data(make_cfg(["dataset=fake", "dataset.shape=[3,32,32]",
                                      "dataset.num_classes=100"]).dataset)


@pytest.mark.parametrize("arch", [a for a in options("student") if a not in ("none", "cnn1d")])
def test_every_zoo_option_builds_as_student_and_teacher(arch, fake_data):
    for group in ("student", "teacher"):
        cfg = make_cfg([f"{group}={arch}"])
        model = build.build_model(cfg[group], group, fake_data)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_cnn1d_builds_on_mnist1d():
    cfg = make_cfg(["dataset=mnist1d", "student=cnn1d"])
    data = build.build_data(cfg.dataset)
    model = build.build_model(cfg.student, "student", data)
    assert model(data.test.x[:3] if hasattr(data.test, "x") else torch.zeros(3, 1, 40)).shape \
        == (3, 10)


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_option(loss):
    """Every loss builds and gives a finite scalar loss: logit objectives from logits, objectives
    that own their step (feature / adversarial methods) through bind + step_terms on two small
    CNNs (a pool of two for multi-teacher ones)."""
    objective = build.build_objective(make_cfg([f"loss={loss}"]).loss)
    assert isinstance(objective, Objective)
    if not objective.owns_step:
        s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        terms = objective(s, t if objective.needs_teacher else None, y)
    else:
        data = build.build_data(make_cfg(["dataset=fake", "dataset.shape=[3,16,16]",
                                          "dataset.train_size=64"]).dataset)
        torch.manual_seed(0)
        student = create("resnet8", 10, 3, (16, 16))
        teachers = [create("resnet14", 10, 3, (16, 16)).eval() for _ in range(2)]
        teacher = (teachers if objective.multiple_teachers
                   else teachers[0] if objective.needs_teacher else None)
        objective.bind(student, teacher, data)
        batch = next(iter(data.train.train_batches(8, 0, 1)))
        ctx = StepContext(epoch=1, step=0, steps_per_epoch=7, total_steps=14)
        terms = objective.step_terms(student, teacher, batch, ctx)
        terms["loss"].backward()
        assert any(p.grad is not None for p in student.parameters())
        assert all(p.grad is None for t in teachers for p in t.parameters())
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_optimizer_and_scheduler(optimizer, scheduler):
    cfg = make_cfg([f"optimizer={optimizer}", f"scheduler={scheduler}",
                    "scheduler.warmup_epochs=1"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build.build_optimizer(cfg.optimizer, params)
    sched = build.build_scheduler(cfg.scheduler, opt, steps_per_epoch=10, epochs=4)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    base = cfg.optimizer.lr
    assert lrs[0] == pytest.approx(base / 10)      # first warm-up step: 1/10 of the ramp
    assert lrs[9] == pytest.approx(base)           # warm-up reaches the base lr
    assert max(lrs) <= base * (1 + 1e-9)
    if scheduler == "cosine":
        assert lrs[-1] < base * 0.01               # decays to ~0 at the end of the run
    # the state dict is plain data (checkpoints load with weights_only=True)
    torch.save(sched.state_dict(), "/dev/null")


def test_multistep_milestones_are_in_epochs():
    cfg = make_cfg(["scheduler=multistep", "scheduler.milestones=[2,3]", "optimizer.lr=1.0"])
    opt = build.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    sched = build.build_scheduler(cfg.scheduler, opt, steps_per_epoch=5, epochs=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == [1.0] * 10
    assert lrs[10:15] == pytest.approx([0.1] * 5) and lrs[15:] == pytest.approx([0.01] * 5)


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_option_composes(dataset):
    cfg = make_cfg([f"dataset={dataset}"])
    assert OmegaConf.select(cfg, "dataset.val_fraction") == pytest.approx(0.1)
    assert cfg.dataset._target_.startswith("distill_cli.data.")


@pytest.mark.parametrize("dataset", ["fake", "digits", "mnist1d", "fashion_mnist"])
def test_datasets_available_here_instantiate(dataset):
    data = build.build_data(make_cfg([f"dataset={dataset}"]).dataset)
    assert data.num_classes == 10
    assert len(data.train) > len(data.val) > 0 and len(data.test) > 0


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_option(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = build.build_logger(make_cfg([f"logger={logger}"]).logger, run_dir=tmp_path,
                             config={"a": 1}, name="t")
    log.log({"x": 1.0}, step=1)
    log.finish(0)


def test_allow_list_rejects_foreign_targets():
    with pytest.raises(UserError):
        build.instantiate(OmegaConf.create({"_target_": "subprocess.run"}), "loss")
