"""The LM teacher-output store holds packed top-k rows for loss=topk: [T, 2k] (top-k
log-probabilities descending, then their indices) instead of [T, V] logits. Stored rows equal the
live teacher's batch by batch (float32 and float16), a table is computed once and served to
later runs, a stored run ends with the live run's weights, and what the dtype or the vocabulary
cannot serve is refused with the key (exit 2 from the CLI)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from distill_cli.config import build
from distill_cli.errors import UserError
from distill_cli.numerics import autocast
from distill_cli.tasks.lm.divergences import pack_topk
from distill_cli.tasks.lm.methods.topk import TopK
from distill_cli.tasks.lm.task import LMTask
from distill_cli.teachers.outputs import TeacherOutputs
from distill_cli.teachers.topology import frozen_logits
from distill_cli.training.run import run

from conftest import make_cfg
from test_cli import distill

BASE = ["recipe=lm_stdlib_tiny", "logger=none", "dataset.block_size=32",
        "dataset.limit_train=96", "dataset.limit_eval=24", "trainer.epochs=2",
        "trainer.batch_size=16", "teacher.train.epochs=1", "teacher.d_model=32",
        "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16", "student.n_heads=2",
        "student.n_layers=1", "trainer.log_every_n_steps=2"]
TINY = [*BASE, "loss=topk", "loss.k=8"]
K = 8


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_rows_equal_the_live_packed_rows(tmp_path, dtype):
    cfg = make_cfg(TINY)
    data = build.build_data(cfg.dataset)
    torch.manual_seed(0)
    teacher = LMTask().build_model(cfg.teacher, "teacher", data).eval()
    signal = LMTask().stored_signal(TopK(k=K), data, dtype)
    T, V = int(data.input_shape[-1]), data.num_classes
    assert signal.row_shape == (T, 2 * K)
    store = TeacherOutputs(teacher=teacher, teacher_id={"test": 1}, data=data,
                           row_shape=signal.row_shape, batch_size=16, data_seed=3,
                           device=torch.device("cpu"),
                           autocast=lambda: autocast(torch.device("cpu"), "32"), root=tmp_path,
                           dtype=dtype, transform=signal.transform,
                           transform_id=signal.identity)
    table = store.train_table(1)
    assert store.built == ["train"] and table.shape == (len(data.train), T, 2 * K)
    assert np.load(store.dir / "train.npy").dtype == np.dtype(dtype)   # what the disk holds
    n = 0
    for epoch in (1, 2):
        for batch in data.train.train_batches(16, 3, epoch):
            live = frozen_logits(teacher, batch.x, dtype, signal.transform)
            assert torch.equal(table[batch.index], live)
            n += 1
    assert n > 4 and store.built == ["train"]   # one table serves every epoch
    # the rows are pack_topk of the teacher's logits, rounded to the dtype: descending
    # log-probabilities <= 0, then integral indices < V (exact in float16 below 2048)
    with torch.no_grad():
        dense = teacher(data.train.x[:4])
    want = pack_topk(dense, K).to(getattr(torch, dtype)).float()
    assert torch.equal(table[:4], want)
    values, idx = table[..., :K], table[..., K:]
    assert bool((values[..., 1:] <= values[..., :-1]).all()) and bool((values <= 0).all())
    assert torch.equal(idx, idx.round()) and int(idx.max()) < V
    assert torch.equal(idx[:4].long(), dense.topk(K, dim=-1).indices)
    # another k is another table (the key names it); plain logits keep their own key
    other = LMTask().stored_signal(TopK(k=K + 1), data, dtype)
    assert other.identity != signal.identity
    plain = TeacherOutputs(teacher=teacher, teacher_id={"test": 1}, data=data,
                           row_shape=(T, V), batch_size=16, data_seed=3,
                           device=torch.device("cpu"), autocast=store.autocast, root=tmp_path,
                           dtype=dtype)
    assert plain.key != store.key and plain.serves_eval and not store.serves_eval


def test_the_table_is_computed_once_and_served_to_the_next_runs(tmp_path, home):
    first = run(make_cfg(TINY), tmp_path / "a", tty=False)
    assert first["teacher/outputs"] == "stored"   # the recipe's default for loss=topk
    assert first["teacher/outputs_hit_rate"] == 0.0
    tables = list((home / "outputs").glob("*/train.npy"))
    assert len(tables) == 1 and np.load(tables[0]).shape == (96, 32, 2 * K)
    assert not list((home / "outputs").glob("*/val.npy"))   # eval references stay live
    stamp = tables[0].stat().st_mtime_ns
    second = run(make_cfg([*TINY, "seed=1"]), tmp_path / "b", tty=False)
    assert second["teacher/outputs_hit_rate"] == 1.0
    assert second["teacher/outputs_key"] == first["teacher/outputs_key"]
    assert tables[0].stat().st_mtime_ns == stamp
    assert list((home / "outputs").glob("*/train.npy")) == tables


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_stored_topk_run_ends_with_the_live_runs_weights(tmp_path, home, dtype):
    common = [*TINY, f"teacher.outputs_dtype={dtype}"]
    live = run(make_cfg([*common, "teacher.outputs=live"]), tmp_path / "live", tty=False)
    stored = run(make_cfg([*common, "teacher.outputs=store"]), tmp_path / "stored", tty=False)
    assert live["teacher/outputs"] == "live" and stored["teacher/outputs"] == "stored"
    a, b = weights(tmp_path / "live"), weights(tmp_path / "stored")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the references (agreement, token KL) are the teacher's dense logits in both runs
    for key in ("best/test/agreement", "best/test/token_kl", "best/test/ppl"):
        assert live[key] == stored[key], key


def test_dense_objectives_keep_dense_rows_stored_or_live(tmp_path, home):
    """fkl reads the full logits: its rows stay [T, V] (evaluation tables stored too), and a
    stored fkl run ends with the live one's weights."""
    data = build.build_data(make_cfg(TINY).dataset)
    from distill_cli.tasks.lm.methods.fkl import FKL
    signal = LMTask().stored_signal(FKL(), data, "float16")
    assert signal.row_shape == (32, data.num_classes) and signal.transform is None
    common = [*BASE, "loss=fkl"]
    live = run(make_cfg([*common, "teacher.outputs=live"]), tmp_path / "live", tty=False)
    stored = run(make_cfg([*common, "teacher.outputs=store"]), tmp_path / "stored", tty=False)
    assert live["teacher/outputs"] == "live" and stored["teacher/outputs"] == "stored"
    a, b = weights(tmp_path / "live"), weights(tmp_path / "stored")
    assert all(torch.equal(a[k], b[k]) for k in a)
    table = next((home / "outputs").glob("*/train.npy"))
    assert np.load(table).shape == (96, 32, data.num_classes)
    assert list((home / "outputs").glob("*/val.npy"))


def _bpe_docs(folder):
    """Random words: a byte-level BPE learns > 2048 ids from them in ~2 s."""
    folder.mkdir()
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(8):
        words = ("".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))
                 for _ in range(3000))
        (folder / f"{i}.txt").write_text(" ".join(words))
    return folder


@pytest.mark.parametrize("k, dtype, V, key", [
    (300, "float32", 258, "loss.k"),                    # more tokens than the vocabulary
    (129, "float32", 258, "loss.k"),                    # 2k = V: the width of dense logits
    (8, "float16", 2300, "teacher.outputs_dtype"),      # indices >= 2048 are not float16-exact
])
def test_what_the_rows_cannot_hold_is_refused(k, dtype, V, key):
    class Data:
        input_shape, num_classes = (1, 32), V
    with pytest.raises(UserError) as info:
        LMTask().stored_signal(TopK(k=k), Data, dtype)
    assert info.value.key == key and info.value.fix
    LMTask().stored_signal(TopK(k=8), type("D", (), {"input_shape": (1, 32),
                                                     "num_classes": 2048}), "float16")


def test_the_cli_refuses_them_with_exit_2(tmp_path):
    """... before any teacher is trained: the store stays empty."""
    docs = _bpe_docs(tmp_path / "docs")
    common = [*BASE, "loss=topk", "dataset.corpus=path", f"dataset.path={docs}",
              "dataset.block_size=16", "dataset.limit_train=64", "dataset.limit_eval=16"]
    home = tmp_path / "home"
    proc = distill(*common, "loss.k=300", tmp_path=tmp_path, check_rc=2,
                   env={"DISTILL_HOME": str(home)})
    assert not (home / "teachers").exists() or not any((home / "teachers").iterdir())
    said = " ".join(proc.stderr.split())
    assert said.startswith("error: ") and "Config key: `loss.k`" in said
    assert "Traceback" not in proc.stderr
    proc = distill(*common, "loss.k=8", "dataset.tokenizer=bpe", "dataset.vocab_size=2300",
                   "teacher.outputs_dtype=float16", tmp_path=tmp_path, check_rc=2)
    said = " ".join(proc.stderr.split())
    assert "Config key: `teacher.outputs_dtype`" in said and "outputs_dtype=float32" in said
    assert "Traceback" not in proc.stderr
