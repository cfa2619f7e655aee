"""task=dataset_distill end to end: the synthetic set, the real class-balanced batches, the
evaluation protocol, the run's files, refusals, and exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from distill_cli.data.digits import build as digits
from distill_cli.errors import UserError
from distill_cli.runs import checkpoint
from distill_cli.tasks.dataset_distill.protocol import Evaluator, Protocol
from distill_cli.tasks.dataset_distill.synthetic import init_set
from distill_cli.tasks.dataset_distill.task import DatasetDistillTask
from distill_cli.training.run import RunInterrupted, run

from conftest import make_cfg

TINY = ["recipe=dd_digits", "logger=none", "task.iterations=4", "trainer.epochs=2",
        "task.eval.epochs=15", "task.eval.models=2", "student.ipc=2"]
NET = {"arch": "convnet", "width": 8, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}


@pytest.fixture(scope="module")
def data():
    return digits(root="data")


def test_real_init_takes_distinct_seeded_images_of_each_class(data):
    a = init_set(data.train, 10, 3, "real", seed=5)
    b = init_set(data.train, 10, 3, "real", seed=5)
    c = init_set(data.train, 10, 3, "real", seed=6)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    split = data.train
    real = (split.x.float() / 255 - split._mean) / split._std
    for row, label in zip(a.images, a.labels):
        hits = (real == row).flatten(1).all(1).nonzero().flatten()
        assert len(hits) and int(split.y[hits[0]]) == int(label)   # a real image of its class
    assert a.labels.tolist() == [c for c in range(10) for _ in range(3)]


def test_batches_are_class_balanced_and_a_pure_function_of_seed_epoch_step(data):
    task = DatasetDistillTask(iterations=3, batch_real=7, net=NET)
    first = list(task.train_batches(data, 1, 11, 2, 0, None))
    again = list(task.train_batches(data, 1, 11, 2, 1, None))
    assert len(first) == 3 and len(again) == 2
    assert all(torch.equal(a.x, b.x) for a, b in zip(first[1:], again))   # resume mid-epoch
    y = first[0].y
    assert y.tolist() == [c for c in range(10) for _ in range(7)]      # class-ordered
    assert len(set(first[0].index.tolist())) == 70                      # distinct images
    assert torch.equal(data.train.y[first[0].index], y)
    other = next(task.train_batches(data, 1, 12, 2, 0, None))
    assert not torch.equal(other.index, first[0].index)


def test_protocol_is_deterministic_for_a_seed_and_scores_mean_and_std(data):
    proto = Protocol(net=NET, models=2, epochs=5, dsa_strategy="color_crop_cutout_scale_rotate")
    synthetic = init_set(data.train, 10, 2, "real", seed=0)
    out = []
    for seed in (3, 3, 4):
        nets = Evaluator(proto, data.input_shape, 10, seed).networks(synthetic, 2)
        x = next(data.test.eval_batches(64)).x
        with torch.no_grad():
            out.append(torch.stack([n(x) for n in nets]))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    task = DatasetDistillTask(net=NET)
    targets = torch.tensor([0, 1, 2, 3])
    logits = torch.eye(4).repeat(3, 1, 1)
    logits[1, 0] = torch.tensor([0., 5, 0, 0])    # model 1 misses one of four
    logits[2, :2] = torch.tensor([[0., 5, 0, 0], [5., 0, 0, 0]])   # model 2 misses two
    s = task.score(logits, targets)
    accs = torch.tensor([100., 75., 50.], dtype=torch.float64)
    assert s["acc1"] == pytest.approx(float(accs.mean()))
    assert s["acc1_model_std"] == pytest.approx(float(accs.std(unbiased=False)))
    assert s["models"] == 3


@pytest.mark.parametrize("overrides,key", [
    (["student.ipc=500"], "student.ipc"),
    (["student=cnn"], "student"),
    (["loss=kd", "teacher=cnn"], "loss"),
    (["task.iterations=0"], "task.iterations"),
    (["task.eval.models=0"], "task.eval.models"),
    (["loss=sre2l"], "teacher"),             # a method that needs a teacher, without one
])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(UserError) as info:
        run(make_cfg(TINY + overrides), tmp_path / "r", tty=False)
    assert info.value.key == key and info.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_dataset_distillation_loss_under_the_classification_task_is_refused(tmp_path):
    with pytest.raises(UserError) as info:
        run(make_cfg(["dataset=digits", "logger=none", "student=mlp", "loss=dm"]),
            tmp_path / "r", tty=False)
    assert info.value.key == "loss"


def test_a_run_leaves_the_set_its_grids_and_the_protocols_scores(tmp_path):
    # 100 evaluation epochs: enough for 20 real-initialised images to beat chance (10%) clearly
    summary = run(make_cfg(TINY + ["loss=dm", "task.eval.epochs=100"]), tmp_path / "r",
                  tty=False)
    assert summary["status"] == "finished" and summary["task"] == "dataset_distill"
    assert summary["best/test/models"] == 2 and summary["best/test/acc1"] > 30
    for name in ("grid_start.png", "grid_best.png", "grid_last.png", "distilled.pt",
                 "distilled_last.pt"):
        assert (tmp_path / "r" / name).is_file(), name
    saved = torch.load(tmp_path / "r" / "distilled.pt", weights_only=True)
    best = checkpoint.load(tmp_path / "r" / "checkpoints" / "best.pt", "t")["model"]
    assert torch.equal(saved["images"], best["images"])
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "val/acc1" in rows[0]


# DC carries its network (and the network's optimizer) across the 3 updates of an outer loop:
# the interruption at step 5 falls inside one
@pytest.mark.parametrize("method", [["loss=dm"], ["loss=dc", "loss.outer_loop=3",
                                                  "loss.inner_loop=2"]])
def test_resume_after_an_interruption_is_bit_exact(tmp_path, method):
    full = run(make_cfg(TINY + method), tmp_path / "full", tty=False)
    with pytest.raises(RunInterrupted):
        run(make_cfg(TINY + method + ["trainer.stop_at_step=5"]), tmp_path / "cut", tty=False)
    resumed = run(make_cfg(TINY + method + ["trainer.resume=auto"]), tmp_path / "cut",
                  tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")["model"]
    assert torch.equal(a["images"], b["images"])
    assert resumed["best/test/acc1"] == full["best/test/acc1"]


@pytest.mark.parametrize("loss", ["dc", "dsa", "dm", "datadam", "mtt", "sre2l", "cda"])
def test_every_method_builds_and_moves_the_images(tmp_path, data, loss):
    """Each method's YAML composes under its recipe, binds to a set and one update's loss is a
    finite scalar whose gradient reaches the images."""
    from distill_cli.config.build import build_model, build_objective
    from distill_cli.losses.base import StepContext

    recipe = "dd_digits_sre2l" if loss in ("sre2l", "cda") else "dd_digits"
    extra = (["loss.experts.num=1", "loss.experts.epochs=2", "loss.max_start_epoch=1",
              "loss.expert_epochs=1", "loss.syn_steps=2", f"store.root={tmp_path}"]
             if loss == "mtt" else [])
    cfg = make_cfg([f"recipe={recipe}", f"loss={loss}", "student.ipc=1", *extra])
    objective = build_objective(cfg.loss)
    task = DatasetDistillTask(**{k: cfg.task[k] for k in ("iterations", "batch_real", "net",
                                                           "eval")})
    torch.manual_seed(0)
    student = task.build_model(cfg.student, "student", data)
    teacher = (build_model(cfg.teacher, "teacher", data).eval() if objective.needs_teacher
               else None)
    objective.bind(student, teacher, data)
    batch = next(task.train_batches(data, 1, 0, 1, 0, None))
    ctx = StepContext(epoch=1, step=0, steps_per_epoch=4, total_steps=8)
    terms = objective.step_terms(student, teacher, batch, ctx)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert student.images.grad is not None and student.images.grad.abs().sum() > 0


def test_the_grids_reach_wandb(tmp_path, monkeypatch):
    """The set's grids go to the W&B run as images (offline: real run files on disk)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(make_cfg([*TINY, "loss=dm", "logger=wandb", "trainer.epochs=1"]), tmp_path / "r",
        tty=False)
    import wandb

    wandb.teardown()   # waits for the offline writer, as at process exit (test_config.py)
    images = sorted(p.name for p in (tmp_path / "r" / "wandb").rglob("synthetic/*.png"))
    assert [n.split("_")[0] for n in images] == ["best", "last", "start"], images


@pytest.mark.parametrize("net", ["{arch:mlp}", "{arch:resnet8}"])
def test_cross_architecture_evaluation(tmp_path, net):
    """task.eval.net: the same set judged by another zoo network (an MLP, a ResNet)."""
    summary = run(make_cfg([*TINY, "loss=dm", "trainer.epochs=1", f"task.eval.net={net}"]),
                  tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["best/test/models"] == 2


@pytest.mark.parametrize("recipe,shape", [("dd_digits", (1, 8, 8)), ("dd_digits_sre2l", (1, 8, 8)),
                                          ("dd_fmnist", (1, 28, 28)), ("dd_fmnist_cpu", (1, 28, 28)),
                                          ("dd_mnist", (1, 28, 28)),
                                          ("dd_cifar10", (3, 32, 32))])
def test_every_dataset_distillation_recipe_composes_and_builds(recipe, shape):
    """Each dd_* recipe composes into a dataset-distillation run whose task, objective, set and
    evaluation network build on data of its dataset's shape (a synthetic stand-in)."""
    from distill_cli.config.build import build_objective
    from distill_cli.data.fake import build as fake
    from distill_cli.tasks.dataset_distill.nets import build_net

    cfg = make_cfg([f"recipe={recipe}"])
    assert cfg.task._target_.endswith("DatasetDistillTask") and cfg.student.arch == "synthetic"
    assert build_objective(cfg.loss).task_name == "dataset_distill"
    stand_in = fake(shape=list(shape), num_classes=10, train_size=200, test_size=20)
    task = DatasetDistillTask(**{k: cfg.task[k] for k in ("iterations", "batch_real", "net",
                                                           "eval")})
    synthetic = task.build_model(cfg.student, "student", stand_in)
    assert synthetic.images.shape == (10 * cfg.student.ipc, *shape)
    net = build_net(cfg.task.eval.net, shape, 10, seed=0)
    assert net(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("recipe", ["dd_fmnist", "dd_mnist", "dd_cifar10"])
@pytest.mark.parametrize("loss", ["dc", "dsa"])
def test_authors_recipes_give_dc_its_1000_iterations_at_every_ipc(recipe, loss):
    """An authors' DC / DSA iteration is outer_loop set updates (get_loops: IPC 1 -> 1, 10 -> 10,
    50 -> 50), so the authors' 1,000 iterations are 1,000 / 10,000 / 50,000 engine steps; an
    explicit outer_loop counts as given."""
    for ipc, updates in ((1, 1_000), (10, 10_000), (50, 50_000)):
        cfg = make_cfg([f"recipe={recipe}", f"loss={loss}", f"student.ipc={ipc}"])
        assert cfg.trainer.epochs * cfg.task.iterations == updates
    cfg = make_cfg([f"recipe={recipe}", f"loss={loss}", "student.ipc=10", "loss.outer_loop=4"])
    assert cfg.trainer.epochs * cfg.task.iterations == 4_000
    cfg = make_cfg([f"recipe={recipe}", "loss=dm", "student.ipc=10"])   # DM: plain steps
    assert cfg.task.iterations == 100


def test_dc_set_updates_follows_the_authors_outer_loops():
    from distill_cli.config.resolvers import dc_set_updates
    from distill_cli.tasks.dataset_distill.methods.dc import AUTHORS_LOOPS

    for ipc, (outer, _inner) in AUTHORS_LOOPS.items():
        assert dc_set_updates(ipc, "auto", 7) == 7 * outer
    assert dc_set_updates(10, 3, 7) == 21
