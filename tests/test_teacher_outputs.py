"""The teacher-output store is exact: stored logits equal live ones batch by batch, a run
served from the store ends with the live run's weights, corrupt tables are rebuilt, and
concurrent builders leave one valid table."""
from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch

from distill_cli.config import build
from distill_cli.numerics import autocast
from distill_cli.teachers.topology import frozen_logits as teacher_logits
from distill_cli.training.run import RunInterrupted, run
from distill_cli.teachers.outputs import TeacherOutputs

from conftest import DIGITS, make_cfg

# augmented fake images: per-epoch tables (crop + flip depend on data_seed, epoch and step)
AUG = ["dataset=fake", "dataset.shape=[3,16,16]", "dataset.train_size=600",
       "dataset.augment.crop_padding=2", "dataset.augment.hflip=true"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def outputs_for(overrides, root, teacher, batch_size=64, data_seed=5):
    cfg = make_cfg(overrides)
    data = build.build_data(cfg.dataset)
    return data, TeacherOutputs(teacher=teacher, teacher_id={"test": 1}, data=data,
                                 row_shape=(data.num_classes,),
                                batch_size=batch_size, data_seed=data_seed,
                                device=torch.device("cpu"),
                                autocast=lambda: autocast(torch.device("cpu"), "32"), root=root)


def small_teacher(data):
    torch.manual_seed(0)
    cfg = make_cfg(["student=resnet8"])
    return build.build_model(cfg.student, "student", data).eval()


def test_stored_equals_live_for_every_batch(tmp_path):
    data, _ = outputs_for(AUG, tmp_path, None)
    teacher = small_teacher(data)
    _, store = outputs_for(AUG, tmp_path, teacher)
    assert store.augmented
    for epoch in (1, 2):
        table = store.train_table(epoch)
        for batch in data.train.train_batches(64, 5, epoch):
            assert torch.equal(table[batch.index], teacher_logits(teacher, batch.x))
    assert store.built == ["train_e0001", "train_e0002"]
    # epochs differ (augmentation), so the tables do too
    assert not torch.equal(store.train_table(1), store.train_table(2))
    assert store.built == ["train_e0001", "train_e0002"]  # served, not rebuilt


def test_plain_view_is_one_table_for_all_epochs(tmp_path):
    data, _ = outputs_for(DIGITS, tmp_path, None)
    teacher = small_teacher(data)
    _, store = outputs_for(DIGITS, tmp_path, teacher)
    assert not store.augmented
    store.train_table(1), store.train_table(7)
    assert store.built == ["train"]
    # another run with another data_seed shares the plain table
    _, other = outputs_for(DIGITS, tmp_path, teacher, data_seed=99)
    assert other.key == store.key
    other.train_table(3)
    assert other.built == [] and other.stats()["teacher/outputs_hit_rate"] == 1.0


def test_corrupt_or_partial_tables_are_rebuilt_not_used(tmp_path):
    data, _ = outputs_for(DIGITS, tmp_path, None)
    teacher = small_teacher(data)
    _, store = outputs_for(DIGITS, tmp_path, teacher)
    good = store.train_table(1).clone()
    npy = store.dir / "train.npy"
    assert npy.exists()
    arr = np.load(npy)
    arr[0] += 1.0                       # silent corruption of a sampled row
    np.save(npy, arr)
    _, again = outputs_for(DIGITS, tmp_path, teacher)
    assert torch.equal(again.train_table(1), good) and again.built == ["train"]
    (store.dir / "train.json").unlink()  # a crash between the table and its metadata
    _, third = outputs_for(DIGITS, tmp_path, teacher)
    assert torch.equal(third.train_table(1), good) and third.built == ["train"]
    npy.write_bytes(npy.read_bytes()[:100])  # truncated
    _, fourth = outputs_for(DIGITS, tmp_path, teacher)
    assert torch.equal(fourth.train_table(1), good) and fourth.built == ["train"]


def _build_table(root, state, queue):
    torch.set_num_threads(1)
    data, _ = outputs_for(AUG, root, None)
    teacher = small_teacher(data)
    teacher.load_state_dict(state)
    _, store = outputs_for(AUG, root, teacher)
    store.train_table(1)
    queue.put(store.built)


def test_concurrent_builders_leave_one_valid_table(tmp_path):
    data, _ = outputs_for(AUG, tmp_path, None)
    state = small_teacher(data).state_dict()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_table, args=(tmp_path, state, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    built = [queue.get(timeout=5) for _ in procs]
    assert sorted(map(len, built)) == [0, 1]  # exactly one process computed the table
    tables = list(tmp_path.glob("outputs/*/train_e0001.npy"))
    assert len(tables) == 1 and json.loads(tables[0].with_suffix(".json").read_text())


@pytest.mark.parametrize("augmented, fmt", [(False, []), (True, []),
                                            (True, ["trainer.channels_last=true"])])
def test_stored_run_ends_with_the_live_runs_weights(tmp_path, home, augmented, fmt):
    base = [o for o in DIGITS if o != "dataset=digits"] + AUG if augmented else DIGITS
    teacher = ["teacher=resnet8", "teacher.train.epochs=1", "student=resnet8", "loss=kd", *fmt]
    live = run(make_cfg(base + teacher + ["teacher.outputs=live"]), tmp_path / "live",
               tty=False)
    stored = run(make_cfg(base + teacher + ["teacher.outputs=store"]), tmp_path / "stored",
                 tty=False)
    assert live["teacher/outputs"] == "live" and stored["teacher/outputs"] == "stored"
    a = torch.load(tmp_path / "live/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stored/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert live["best/test/agreement"] == stored["best/test/agreement"]
    # another seed: a plain view shares every table; an augmented one (data_seed follows seed)
    # shares only val/test
    again = run(make_cfg(base + teacher + ["teacher.outputs=store", "seed=1"]),
                tmp_path / "again", tty=False)
    rate = again["teacher/outputs_hit_rate"]
    assert ((0 < rate < 1) if augmented else rate == 1.0), rate
    fixed = run(make_cfg(base + teacher + ["teacher.outputs=store", "seed=2", "data_seed=0"]),
                tmp_path / "fixed", tty=False)
    assert fixed["teacher/outputs_hit_rate"] == 1.0  # a fixed data_seed shares everything


def test_float16_outputs_quantise_the_live_path_alike(tmp_path, home):
    teacher = ["teacher=resnet8", "teacher.train.epochs=1", "student=mlp", "loss=kd",
               "teacher.outputs_dtype=float16"]
    run(make_cfg(DIGITS + teacher + ["teacher.outputs=live"]), tmp_path / "live", tty=False)
    run(make_cfg(DIGITS + teacher + ["teacher.outputs=store"]), tmp_path / "stored", tty=False)
    a = torch.load(tmp_path / "live/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stored/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list((home / "outputs").glob("*/train.npy"))
    assert np.load(next((home / "outputs").glob("*/train.npy"))).dtype == np.float16


def test_mixup_batches_are_stored_exactly_and_resume_bit_exactly(tmp_path, home):
    """The teacher sees the same mixed batch whether its outputs are live or stored, and a
    stopped mixup run resumes to the uninterrupted run's weights."""
    base = DIGITS + ["teacher=resnet8", "teacher.train.epochs=1", "student=mlp", "loss=kd",
                     "augment.mix.mixup_alpha=0.4", "augment.mix.cutmix_alpha=1.0"]
    live = run(make_cfg(base + ["teacher.outputs=live"]), tmp_path / "live", tty=False)
    stored = run(make_cfg(base + ["teacher.outputs=store"]), tmp_path / "stored", tty=False)
    assert stored["teacher/outputs"] == "stored" and live["teacher/outputs"] == "live"
    a = torch.load(tmp_path / "live/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stored/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["teacher.outputs=store", "trainer.stop_at_step=9"]),
            tmp_path / "parted", tty=False)
    run(make_cfg(base + ["teacher.outputs=store", "trainer.resume=auto"]), tmp_path / "parted",
        tty=False)
    c = torch.load(tmp_path / "parted/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_hard_label_losses_refuse_mixed_batches(tmp_path):
    from distill_cli.errors import UserError
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["teacher=resnet8", "loss=dkd", "augment.mix.mixup_alpha=0.2"]),
            tmp_path / "r", tty=False)
    assert info.value.key == "augment.mix"
