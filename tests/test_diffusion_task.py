"""task=diffusion end to end on digits: a store-trained denoiser teacher and feature classifier,
every step-distillation method, sample-quality metrics at several step counts, grids, stored
(noise, endpoint) pairs, exact resume and refusals."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from distill_cli.models.diffusion import samplers
from distill_cli.reporting.report import report
from distill_cli.runs import checkpoint
from distill_cli.training.run import RunInterrupted, run

from conftest import make_cfg

TINY = ["recipe=diffusion_digits", "logger=none", "task.steps=4", "task.eval.samples=64",
        "task.eval.val_samples=32", "task.eval.reference=200", "task.eval.steps=[1,2]",
        "task.eval.kid_subset_size=32", "task.eval.grid_columns=4",
        "task.feature_net.train.epochs=2", "teacher.train.epochs=2",
        "dataset.limit_train=256", "trainer.epochs=2", "trainer.batch_size=32",
        "teacher.train.batch_size=32", "teacher.channels=8", "student.channels=8",
        "trainer.log_every_n_steps=4"]
METHODS = {"progressive": ["loss=progressive", "loss.start_steps=4"],
           "consistency": ["loss=consistency"],
           "consistency_training": ["loss=consistency_training"],
           "reflow": ["loss=reflow"],
           "direct": ["loss=direct"]}


def test_a_teacher_run_reports_sample_quality_at_every_step_count(tmp_path):
    alone = [o for o in TINY if not o.startswith("teacher.")]   # no teacher: a teacher's run
    summary = run(make_cfg([*alone, "loss=dsm", "teacher=none"]), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["task"] == "diffusion"
    assert summary["selection_metric"] == "neg_fd"
    for steps in (1, 2, 4):
        for name in ("fd", "kid", "precision", "recall", "class_entropy"):
            assert math.isfinite(summary[f"best/test/{name}@{steps}"]), (name, steps)
    assert summary["best/test/fd"] == summary["best/test/fd@4"] == summary["best/test/fd_cnn"]
    assert summary["best/test/steps"] == 4
    assert summary["feature_net/teacher/source"] == "store"
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "val/fd" in rows[0] and "best/val/neg_fd" in rows[-1]
    assert "val/fd@1" not in rows[0]   # validation samples at the model's own steps only
    for tag in ("best", "last"):
        assert (tmp_path / "r" / f"samples_{tag}.png").stat().st_size > 0


def test_a_conditional_generator_reports_class_accuracy_and_per_class_fd(tmp_path):
    """task.conditional=true: samples are generated for the split's labels; the stored
    classifier's accuracy on them and the mean per-class FD join the metrics, at every step
    count, and the per-class FD is not the overall FD."""
    alone = [o for o in TINY if not o.startswith("teacher.")]
    summary = run(make_cfg([*alone, "loss=dsm", "teacher=none", "task.conditional=true"]),
                  tmp_path / "r", tty=False)
    assert summary["status"] == "finished"
    for steps in (1, 2, 4):
        acc, cfd = summary[f"best/test/class_acc@{steps}"], summary[f"best/test/class_fd@{steps}"]
        assert 0.0 <= acc <= 100.0 and math.isfinite(cfd) and cfd > 0
    assert summary["best/test/class_fd"] != summary["best/test/fd"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_distils_from_the_stored_teacher_and_resumes_exactly(tmp_path, method):
    over = [*TINY, *METHODS[method]]
    full = run(make_cfg(over), tmp_path / "full", tty=False)
    assert full["status"] == "finished"
    assert math.isfinite(full["best/test/fd@1"]) and math.isfinite(full["teacher/test/fd"])
    with pytest.raises(RunInterrupted):
        run(make_cfg([*over, "trainer.stop_at_step=5"]), tmp_path / "cut", tty=False)
    resumed = run(make_cfg([*over, "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["objective"][k], b["objective"][k]) for k in a["objective"])
    assert resumed["best/test/fd"] == full["best/test/fd"]


def test_the_report_ranks_generators_by_fd_with_a_column_per_step_count(tmp_path, capsys):
    for loss in ("direct", "reflow"):
        run(make_cfg([*TINY, f"loss={loss}"]), tmp_path / loss, tty=False)
    rows = report([tmp_path], fmt="md", grids_to=tmp_path / "grids.png")
    text = capsys.readouterr().out
    assert "best FD" in text and "best/test/fd@1" in text and "teacher FD" in text
    header = next(line for line in text.splitlines() if line.startswith("| config"))
    assert "acc1" not in header and "ece" not in header   # no classifier columns, all empty
    fds = [r["best/test/fd"] for r in rows]
    assert fds == sorted(fds)   # lower FD first
    from matplotlib.image import imread
    assert imread(tmp_path / "grids.png").shape[1] > imread(
        tmp_path / "direct" / "samples_best.png").shape[1]   # two grids side by side


def test_stored_pairs_equal_the_live_teacher_and_are_computed_once(tmp_path):
    from distill_cli.config.build import build_data
    from distill_cli.teachers.pairs import pair_noise, teacher_pairs
    from distill_cli.tasks.diffusion.task import DiffusionTask

    cfg = make_cfg([*TINY, "dataset.limit_train=40"])
    data = build_data(cfg.dataset)
    task = DiffusionTask(**{k: cfg.task[k] for k in ("conditional", "eval")},
                         feature_net=cfg.task.feature_net)
    torch.manual_seed(0)
    teacher = task.build_model(cfg.teacher, "teacher", data).eval()
    first = teacher_pairs(teacher, data, store_root=str(tmp_path), steps=3, dtype="float32",
                          batch_size=16)
    again = teacher_pairs(teacher, data, store_root=str(tmp_path), steps=3, dtype="float32")
    assert first.built and not again.built and first.key == again.key
    index = torch.tensor([0, 17, 39, 5])
    noise, end = again.get(index)
    live = samplers.sample(teacher, pair_noise(0, index, (1, 8, 8)), None, steps=3,
                           method=teacher.resolved_sampler)
    assert torch.equal(noise, pair_noise(0, index, (1, 8, 8)))
    assert torch.allclose(end, live, atol=1e-5)   # batch composition: last-bit differences
    other = teacher_pairs(teacher, data, store_root=str(tmp_path), steps=2, dtype="float32")
    assert other.key != first.key   # the sampler's step count is part of the key


def _distill(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_cli", *TINY, *args,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("args,key", [
    (["student=cnn", "loss=dsm"], "student"),                  # a classifier as the generator
    (["loss=kd"], "loss"),                                       # a classifier loss
    (["teacher=cnn"], "teacher"),                                # a classifier teacher
    (["loss.start_steps=6"], "loss.start_steps"),               # not a power of two
    (["task.eval.val_samples=2"], "task.eval.val_samples"),      # too few for k-NN recall
])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, args, key):
    proc = _distill(*args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and key in proc.stderr


def test_a_diffusion_loss_under_the_classification_task_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill_cli", "dataset=digits", "logger=none",
                           "loss=progressive", "student=cnn", "teacher=cnn",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "task=diffusion" in proc.stderr


@pytest.mark.parametrize("recipe,shape", [("diffusion_digits", (1, 8, 8)),
                                          ("diffusion_fmnist", (1, 28, 28)),
                                          ("diffusion_fmnist_cpu", (1, 28, 28)),
                                          ("diffusion_cifar10", (3, 32, 32))])
def test_every_diffusion_recipe_composes_and_builds(recipe, shape):
    """Each diffusion_* recipe composes into a diffusion run whose objective, teacher and student
    denoisers and feature classifier build on data of its dataset's shape (a synthetic stand-in),
    and one teacher/student call maps (noisy image, time) to an image-shaped prediction."""
    from distill_cli.config.build import build_model, build_objective, build_task
    from distill_cli.data.fake import build as fake

    cfg = make_cfg([f"recipe={recipe}"])
    assert cfg.task._target_.endswith("DiffusionTask")
    assert build_objective(cfg.loss).task_name == "diffusion"
    assert build_objective(cfg.teacher.train.loss).task_name == "diffusion"
    task = build_task(cfg.task)
    stand_in = fake(shape=list(shape), num_classes=10, train_size=16, test_size=8)
    z, t = torch.randn(2, *shape), torch.full((2,), 0.5)
    for key in ("teacher", "student"):
        model = task.build_model(cfg[key], key, stand_in)
        assert model(z, t).shape == (2, *shape), key
    feature = build_model(task.stored_models()["feature_net"], "feature_net", stand_in)
    assert feature(z).shape == (2, 10)
