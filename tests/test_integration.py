"""In-process runs on real (tiny) data: what a run writes, distillation from a checkpoint,
bit-exact resume, and real offline W&B files."""
from __future__ import annotations

import json

import pytest
import torch

from distill_cli.training.run import RunInterrupted, run

from conftest import DIGITS, make_cfg


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plain_student_run_writes_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    summary = run(make_cfg(DIGITS + ["student=resnet8", "loss=ce", "trainer.epochs=3"]),
                  run_dir, tty=False)
    assert summary["status"] == "finished" and summary["epochs"] == 3
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("best/val/acc1", "best/test/acc1", "last/test/acc1", "wall_s",
                "train/images_per_s", "seed", "overrides", "git", "best/test/ece"):
        assert key in on_disk, key
    assert on_disk["status"] == "finished"
    # digits are easy: a resnet8 clears 80% in three short epochs
    assert on_disk["best/test/acc1"] > 80.0
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train/loss", "train/ce", "val/acc1", "val/acc5", "val/nll", "val/ece", "lr",
                "train/images_per_s"):
        assert key in rows[0], key
    assert on_disk["best/val/acc1"] == max(r["val/acc1"] for r in rows)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "objective", "state", "rng", "config",
                "git", "wandb_id", "model_config", "data"} <= set(ckpt)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 3 and last["state"]["step"] == rows[-1]["step"]
    assert last["config"]["student"]["arch"] == "resnet8"


def test_kd_from_checkpoint_reports_teacher_and_agreement(tmp_path, digits_teacher):
    run_dir = tmp_path / "kd"
    summary = run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                                     "student=mlp", "loss=kd"]), run_dir, tty=False)
    assert summary["teacher/test/acc1"] > 80.0
    assert 0.0 <= summary["best/test/agreement"] <= 100.0
    rows = read_metrics(run_dir)
    assert {"train/kd", "train/ce", "val/agreement"} <= set(rows[0])
    # the KD term is really computed from the teacher: it is positive and finite
    assert all(0 < r["train/kd"] < 100 for r in rows)


def test_dkd_logs_its_terms_and_warmup(tmp_path, digits_teacher):
    run_dir = tmp_path / "dkd"
    run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                           "student=mlp", "loss=dkd", "loss.warmup=4"]), run_dir, tty=False)
    rows = read_metrics(run_dir)
    # warm-up weight min(epoch/4, 1): epochs counted from 1
    assert [round(r["train/warmup_weight"], 6) for r in rows] == [0.25, 0.5]
    assert {"train/tckd", "train/nckd"} <= set(rows[0])


def _final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("stop_at", [7, 20])  # mid-epoch 1; the last step of epoch 1 (20 steps)
def test_stopped_and_resumed_run_matches_uninterrupted_run(tmp_path, digits_teacher, stop_at):
    base = DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                     "student=resnet8", "loss=kd", "scheduler=cosine"]
    full = tmp_path / "full"
    run(make_cfg(base), full, tty=False)

    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + [f"trainer.stop_at_step={stop_at}"]), parted, tty=False)
    assert json.loads((parted / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(parted / "checkpoints" / "last.pt",
                      weights_only=True)["state"]["step"] == stop_at
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)

    a, b = _final_weights(full), _final_weights(parted)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if "images_per_s" not in k} for r in rows]
    assert strip(read_metrics(full)) == strip(read_metrics(parted))
    assert json.loads((parted / "summary.json").read_text())["status"] == "finished"


def test_fork_from_a_checkpoint_keeps_the_original_run(tmp_path):
    base = DIGITS + ["student=mlp", "loss=ce"]
    first = tmp_path / "first"
    run(make_cfg(base + ["trainer.epochs=1"]), first, tty=False)
    before = (first / "checkpoints" / "last.pt").read_bytes()
    fork = tmp_path / "fork"
    summary = run(make_cfg(base + ["trainer.epochs=2",
                                   f"trainer.resume={first}/checkpoints/last.pt"]), fork,
                  tty=False)
    assert summary["epochs"] == 2 and [r["epoch"] for r in read_metrics(fork)] == [2]
    assert (first / "checkpoints" / "last.pt").read_bytes() == before


def test_offline_wandb_run_writes_real_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "wb"
    summary = run(make_cfg([o for o in DIGITS if o != "logger=none"] +
                           ["logger=wandb", "student=mlp", "loss=ce", "trainer.epochs=1"]),
                  run_dir, tty=False)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no .wandb event file written"
    assert summary["wandb_id"] and summary["wandb_id"] in runs[0].name
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["wandb_id"] == summary["wandb_id"]


def test_bf16_precision_runs_on_cpu(tmp_path):
    summary = run(make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=1",
                                     "trainer.precision=bf16"]), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["best/test/acc1"] > 30.0


def test_fp16_with_loss_scaling_learns_and_resumes_exactly(tmp_path, digits_teacher):
    """trainer.precision=fp16: autocast to float16 with a GradScaler (its state in the
    checkpoint, so a stopped run continues bit-exactly), clipping the unscaled gradients."""
    base = DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}", "student=mlp",
                     "loss=kd", "trainer.precision=fp16", "trainer.grad_clip=5.0"]
    summary = run(make_cfg(base), tmp_path / "full", tty=False)
    assert summary["status"] == "finished" and summary["best/test/acc1"] > 30.0
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=25"]), tmp_path / "parted", tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), tmp_path / "parted", tty=False)
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "parted")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("student,setting,nhwc", [("cnn_small", "auto", True),
                                                  ("mlp", "auto", False),
                                                  ("cnn_small", "false", False),
                                                  ("mlp", "true", True)])
def test_channels_last_auto_means_conv_nets_on_images(tmp_path, student, setting, nhwc):
    cfg = make_cfg([a for a in DIGITS if not a.startswith("trainer.channels_last")] + [
        f"student={student}", "loss=ce", "trainer.epochs=1", f"trainer.channels_last={setting}"])
    summary = run(cfg, tmp_path / "r", tty=False)
    assert summary["channels_last"] is nhwc and summary["status"] == "finished"


def test_channels_last_never_applies_to_1d_signals(tmp_path):
    summary = run(make_cfg(["dataset=mnist1d", "logger=none", "student=cnn1d", "loss=ce",
                            "trainer.epochs=1", "dataset.limit_train=256",
                            "trainer.channels_last=true"]), tmp_path / "r", tty=False)
    assert summary["channels_last"] is False


def test_mnist1d_cnn1d_learns(tmp_path):
    summary = run(make_cfg(["dataset=mnist1d", "logger=none", "student=cnn1d", "loss=ce",
                            "trainer.epochs=3", "trainer.batch_size=100",
                            "optimizer=adamw", "optimizer.lr=3e-3", "optimizer.weight_decay=0",
                            "trainer.log_every_n_steps=20"]), tmp_path / "r", tty=False)
    assert summary["best/test/acc1"] > 40.0  # chance is 10%


def test_real_fashion_mnist_run_of_a_few_hundred_steps(tmp_path):
    """Real data: 200 steps of a small CNN on Fashion-MNIST (from Debian's package or data/)."""
    summary = run(make_cfg(["dataset=fashion_mnist", "dataset.limit_train=25600",
                            "dataset.limit_eval=2000", "logger=none", "student=cnn_small",
                            "loss=ce", "trainer.epochs=1", "trainer.batch_size=128",
                            "optimizer.lr=0.1", "trainer.log_every_n_steps=50"]),
                  tmp_path / "fm", tty=False)
    assert summary["step"] == 200
    assert summary["best/test/acc1"] > 75.0  # chance is 10%; ~80% after 200 steps


def test_a_checkpoint_from_before_the_task_seam_resumes_exactly(tmp_path, digits_teacher):
    """A last.pt written before the task seam (state `best_acc1`, no `task` node, a
    `loss_options` node) continues like any other: same final weights as an uninterrupted run."""
    base = DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                     "student=mlp", "loss=kd"]
    full = tmp_path / "full"
    run(make_cfg(base), full, tty=False)
    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=25"]), parted, tty=False)
    last = parted / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state"]["best_acc1"] = ckpt["state"].pop("best_score")
    del ckpt["config"]["task"]
    ckpt["config"]["loss_options"] = {}
    torch.save(ckpt, last)
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
    a, b = _final_weights(full), _final_weights(parted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_wandb_run_logs_its_student_as_a_model_artifact(tmp_path, monkeypatch):
    """The run's best.pt and last.pt go to W&B as a `model` artifact with aliases best and
    latest (offline: read back from the run's transaction log)."""
    from pathlib import Path

    import wandb

    from test_config import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "wb"
    summary = run(make_cfg([o for o in DIGITS if o != "logger=none"]
                           + ["logger=wandb", "student=mlp", "loss=ce", "trainer.epochs=1"]),
                  run_dir, tty=False)
    wandb.teardown()
    (file,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    arts = [r.artifact for r in wandb_records(file) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in arts] == [("model", f"student-{summary['wandb_id']}")] * 2
    assert "best" in arts[0].aliases and "latest" in arts[1].aliases
    for art, name in zip(arts, ("best.pt", "last.pt")):
        (entry,) = art.manifest.contents
        assert Path(entry.local_path).read_bytes() == (run_dir / "checkpoints" / name).read_bytes()
    assert json.loads(arts[0].metadata)["best/test/acc1"] == summary["best/test/acc1"]
