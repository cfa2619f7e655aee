"""Compose and instantiate every option of every config group through build.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, PoolObjective, StepContext, StepObjective
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


# not image networks: none, cnn1d (1-D inputs), synthetic (task=dataset_distill's set:
# test_dd_task.py), gpt_* and hf (language models, ids -> [B, T, V]: test_gpt.py,
# test_hf_teacher.py)
@pytest.mark.parametrize("arch", [a for a in options("student")
                                  if a not in ("none", "cnn1d", "synthetic", "gpt_tiny",
                                               "gpt_small", "hf")])
def test_every_zoo_option_builds_as_student_and_teacher(arch, fake_data):
    for group in ("student", "teacher"):
        cfg = make_cfg([f"{group}={arch}"])
        model = build.build_model(cfg[group], group, fake_data)
        if cfg[group].arch in ("unet", "dit"):   # a denoiser: an image-shaped prediction
            assert model(torch.zeros(2, 3, 32, 32), torch.rand(2)).shape == (2, 3, 32, 32)
            continue
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_cnn1d_builds_on_mnist1d():
    """cnn1d on the REAL MNIST-1D (the `mnist1d` package's generator; no fallback: a missing
    package or a changed generator fails here)."""
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    data = build.build_data(make_cfg(["dataset=mnist1d"]).dataset)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # the package's own generator, called independently (it reseeds the global RNGs)
        ref = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    assert data.input_shape == (1, 40) and data.num_classes == 10
    assert (len(data.train) + len(data.val), len(data.test)) == (len(ref["x"]), len(ref["x_test"]))
    assert torch.equal(data.test.x[:, 0], torch.tensor(ref["x_test"], dtype=torch.float32))
    assert torch.equal(data.test.y, torch.tensor(ref["y_test"], dtype=torch.int64))
    assert data.test.y.unique().tolist() == list(range(10))
    for group in ("student", "teacher"):
        cfg = make_cfg(["dataset=mnist1d", f"{group}=cnn1d"])
        model = build.build_model(cfg[group], group, data).eval()
        batch = next(data.test.eval_batches(3))
        assert batch.x.shape == (3, 1, 40)
        with torch.no_grad():
            out = model(batch.x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_option(loss):
    """Every loss builds and gives a finite scalar loss: logit objectives from logits, objectives
    that own their step (feature / adversarial methods) through bind + step_terms on two small
    CNNs (a pool of two for multi-teacher ones)."""
    node = make_cfg([f"loss={loss}"]).loss
    if node._target_.startswith("distill_cli.tasks.dataset_distill."):
        pytest.skip("a dataset-distillation objective: tests/test_dd_task.py builds each one")
    if node._target_.startswith("distill_cli.tasks.lm."):
        pytest.skip("a language-model objective on [B, T, V]: tests/test_lm_objectives.py")
    if node._target_.startswith("distill_cli.tasks.diffusion."):
        pytest.skip("a diffusion objective on denoisers: tests/test_diffusion_task.py runs each")
    objective = build.build_objective(node)
    assert isinstance(objective, Objective)
    if not isinstance(objective, StepObjective):
        s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        terms = objective(s, t if objective.needs_teacher else None, y)
    else:
        data = build.build_data(make_cfg(["dataset=fake", "dataset.shape=[3,16,16]",
                                          "dataset.train_size=64"]).dataset)
        torch.manual_seed(0)
        student = create("resnet8", 10, 3, (16, 16))
        teachers = [create("resnet14", 10, 3, (16, 16)).eval() for _ in range(2)]
        teacher = (teachers if isinstance(objective, PoolObjective)
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
    # a distilled set carries its source's split: its val_fraction is null ("as recorded")
    expected = None if dataset == "distilled" else pytest.approx(0.1)
    assert OmegaConf.select(cfg, "dataset.val_fraction") == expected
    assert cfg.dataset._target_.startswith("distill_cli.data.")


@pytest.mark.parametrize("dataset", ["fake", "digits", "mnist1d", "fashion_mnist"])
def test_datasets_available_here_instantiate(dataset):
    data = build.build_data(make_cfg([f"dataset={dataset}"]).dataset)
    assert data.num_classes == 10
    assert len(data.train) > len(data.val) > 0 and len(data.test) > 0


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file (what `wandb sync` uploads): a 7-byte header
    (`:W&B`, magic, version), then LevelDB-log blocks of 32 KiB whose chunks are crc32 (4 bytes),
    length (2), type (1 full, 2 first, 3 middle, 4 last) and data."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def item_dict(items) -> dict:
    """{key: value_json} of W&B record items (their key is `key` or a one-element `nested_key`)."""
    return {i.key or "/".join(i.nested_key): i.value_json for i in items}


def check_none_logger(log, run_dir: Path) -> None:
    assert log.run_id is None
    assert list(run_dir.iterdir()) == []  # writes nothing (metrics.jsonl etc. are the runner's)


def check_wandb_logger(log, run_dir: Path) -> None:
    import wandb

    assert wandb.run is None  # finished, not left open for the next run in this process
    # wandb 0.31: run.finish() can return before the offline transaction log is written (seen
    # in ~1 of 6 runs in one process: 7 bytes, header only); shutting W&B down, as at process
    # exit (its atexit hook), waits for it
    wandb.teardown()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(log.run_id)
    files = list(runs[0].glob("*.wandb"))
    assert len(files) == 1
    by_kind: dict = {}
    for rec in wandb_records(files[0]):
        by_kind.setdefault(rec.WhichOneof("record_type"), []).append(rec)
    (run,) = by_kind["run"]
    assert run.run.run_id == log.run_id and run.run.display_name == "t"
    assert run.run.project == "distill_cli"
    assert item_dict(run.run.config.update).get("a") == "1"
    rows = [item_dict(r.history.item) for r in by_kind["history"]]
    assert [(r["_step"], float(r["probe/metric"])) for r in rows] == [("3", 0.125)]
    summary = {k: v for r in by_kind["summary"] for k, v in item_dict(r.summary.update).items()}
    assert float(summary["best/test/acc1"]) == 87.5
    (exit_rec,) = by_kind["exit"]
    assert exit_rec.exit.exit_code == 0


LOGGER_CHECKS = {"none": ("disabled", check_none_logger),
                 "wandb": ("offline", check_wandb_logger)}


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_option(logger, tmp_path, monkeypatch):
    """Each logger builds, takes a row and a summary and finishes; what it leaves in the run dir
    is checked (W&B offline: the run's own transaction log, read back record by record)."""
    assert logger in LOGGER_CHECKS, f"logger={logger} has no check here: add one"
    mode, check = LOGGER_CHECKS[logger]
    monkeypatch.setenv("WANDB_MODE", mode)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = build.build_logger(make_cfg([f"logger={logger}"]).logger, run_dir=run_dir,
                             config={"a": 1}, name="t")
    log.log({"probe/metric": 0.125}, step=3)
    log.summary({"best/test/acc1": 87.5})
    log.finish(0)
    check(log, run_dir)


def test_allow_list_rejects_foreign_targets():
    with pytest.raises(UserError):
        build.instantiate(OmegaConf.create({"_target_": "subprocess.run"}), "loss")
