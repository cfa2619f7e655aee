"""Language-model text data (data/text.py) and tokenizers (data/tokenizer.py), on real text:
a few hundred KB of this Python's own standard library written out as a `path` corpus."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_cli.config import build as config_build
from distill_cli.data import text
from distill_cli.data.bundle import Split
from distill_cli.errors import UserError
from distill_cli.data import tokenizer as tk

from conftest import REPO, make_cfg

VOCAB = 512


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """~300 KB of real text: stdlib sources as .txt files, each with a unique first line."""
    folder = tmp_path_factory.mktemp("corpus")
    size = 0
    for i, doc in enumerate(text.read_corpus("stdlib")):
        doc = doc[:6000]
        (folder / f"doc{i:03d}.txt").write_text(f"DOCUMENT-{i:03d}\n{doc}", encoding="utf-8")
        size += len(doc)
        if size > 300_000:
            break
    return folder


def _docs(corpus_dir) -> list[str]:
    return text.read_corpus("path", corpus_dir)


@pytest.fixture(scope="module")
def bpe_root(tmp_path_factory, corpus_dir):
    """A store holding the corpus's BPE tokenizer (trained once for the module)."""
    root = tmp_path_factory.mktemp("store")
    text.build(corpus="path", path=str(corpus_dir), tokenizer="bpe", vocab_size=VOCAB,
               block_size=64, store_root=root)
    return root


def _prepare(docs, root, vocab=VOCAB, split_seed=0, builds=None):
    train, _, _ = text.split_documents(len(docs), val_fraction=0.1, test_fraction=0.1,
                                       split_seed=split_seed)
    return tk.prepare("bpe", documents=docs, train=train, corpus_hash=text.content_hash(docs),
                      split=text.split_identity(0.1, 0.1, split_seed), vocab_size=vocab, root=root,
                      on_build=None if builds is None else builds.append)


# --- split and blocks ------------------------------------------------------------------------

def test_split_by_document_is_disjoint_covering_and_seeded():
    a = text.split_documents(200, val_fraction=0.1, test_fraction=0.15, split_seed=3)
    assert [len(s) for s in a] == [150, 20, 30]
    assert sorted(a[0] + a[1] + a[2]) == list(range(200))
    assert a == text.split_documents(200, val_fraction=0.1, test_fraction=0.15, split_seed=3)
    assert a[2] != text.split_documents(200, val_fraction=0.1, test_fraction=0.15,
                                        split_seed=4)[2]


def test_bundle_splits_hold_whole_documents_and_the_stream(corpus_dir, tmp_path):
    """Every document lands in exactly one split, whole, in corpus order, ended by <eod>."""
    data = text.build(corpus="path", path=str(corpus_dir), block_size=100, store_root=tmp_path)
    docs = _docs(corpus_dir)
    names = text.split_documents(len(docs), val_fraction=0.1, test_fraction=0.1, split_seed=0)
    tok = tk.ByteTokenizer()
    for split, members in zip((data.train, data.val, data.test), names):
        x, y = split.x, split.y
        stream = torch.cat([x[:1, 0], y[y != -100]]).numpy()   # first token + every target
        expected = text.token_stream([tok.encode(docs[i]) for i in members], tok.eod_id)
        np.testing.assert_array_equal(stream, expected)
        found = {int(m) for m in re.findall(r"DOCUMENT-(\d+)", tok.decode(stream))}
        assert found == {int(docs[i][9:12]) for i in members}
    assert data.num_classes == 258 and data.input_shape == (1, 100)
    assert data.identity["tokenizer"] == "byte" and str(tmp_path) not in json.dumps(data.identity)


@pytest.mark.parametrize("length,t", [(2, 4), (9, 4), (10, 3), (101, 10), (1000, 7)])
def test_blocks_shift_by_one_and_pad_only_the_tail(length, t):
    stream = np.random.default_rng(length).integers(0, 256, size=length)
    x, y = text.cut_blocks(stream, t, pad_id=257)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == t
    counted = y != -100
    np.testing.assert_array_equal(y[counted].numpy(), stream[1:])        # each target once
    np.testing.assert_array_equal(x[counted].numpy(), stream[:-1])       # its input just before
    assert torch.equal(x[:, 1:][counted[:, :-1]], y[:, :-1][counted[:, :-1]])  # x = y shifted
    assert counted[:-1].all()                                            # padding: last block only
    n = int(counted[-1].sum())      # a full last block has no padding; else the last token
    assert n == t or (x[-1, n] == stream[-1] and (x[-1, n + 1:] == 257).all())  # then <pad>


def test_limits_keep_a_fixed_random_subset(corpus_dir, tmp_path):
    full = text.build(corpus="path", path=str(corpus_dir), block_size=32, store_root=tmp_path)
    small = text.build(corpus="path", path=str(corpus_dir), block_size=32, store_root=tmp_path,
                       limit_train=50, limit_eval=7)
    assert (len(small.train), len(small.val), len(small.test)) == (50, 7, 7)
    rows = {tuple(r) for r in full.train.x.tolist()}
    assert all(tuple(r) in rows for r in small.train.x.tolist())
    assert not torch.equal(small.train.x, full.train.x[:50])   # random, not the first 50
    again = text.build(corpus="path", path=str(corpus_dir), block_size=32, store_root=tmp_path,
                       limit_train=50, limit_eval=7)
    assert torch.equal(again.train.x, small.train.x) and again.identity == small.identity


# --- batches ---------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_epoch_step(corpus_dir, tmp_path):
    data = text.build(corpus="path", path=str(corpus_dir), block_size=32, store_root=tmp_path)
    split = data.train
    assert isinstance(split, Split)
    first = list(split.train_batches(16, seed=5, epoch=2))
    assert len(first) == split.num_batches(16, train=True) == len(split) // 16
    again = list(split.train_batches(16, seed=5, epoch=2))
    resumed = list(split.train_batches(16, seed=5, epoch=2, start_step=3))
    for a, b in zip(first, again):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(resumed) == len(first) - 3
    for a, b in zip(first[3:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    b0 = first[0]
    assert b0.x.shape == (16, 32) and b0.x.dtype == torch.int64
    assert torch.equal(b0.x, split.x[b0.index]) and torch.equal(b0.y, split.y[b0.index])
    other = next(iter(split.train_batches(16, seed=5, epoch=3)))
    assert not torch.equal(other.index, b0.index)
    evals = list(data.val.eval_batches(10))
    assert torch.equal(torch.cat([b.index for b in evals]), torch.arange(len(data.val)))
    assert torch.equal(torch.cat([b.y for b in evals]), data.val.targets)
    moved = data.to("cpu")
    assert moved.train.device.type == "cpu" and torch.equal(moved.train.x, split.x)


# --- tokenizers ------------------------------------------------------------------------------

def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out) + "<eod><pad>"


def test_byte_tokenizer_round_trips_arbitrary_utf8():
    tok = tk.ByteTokenizer()
    rng = random.Random(0)
    for _ in range(50):
        s = _random_text(rng, rng.randint(0, 200))
        ids = tok.encode(s)
        assert ids.dtype == np.int64 and (ids < 256).all()       # "<eod>" in text is text
        assert tok.decode(ids) == s
    assert tok.decode([104, 105, 256, 257]) == "hi<eod><pad>"


def test_bpe_trained_once_on_train_documents_and_reused(corpus_dir, bpe_root):
    docs = _docs(corpus_dir)
    builds: list[str] = []
    tok, ids = _prepare(docs, bpe_root, builds=builds)
    assert builds == []                                   # the module fixture trained it
    entry = bpe_root / "tokenizers" / tok.key
    assert tok.vocab_size == VOCAB and (tok.eod_id, tok.pad_id) == (0, 1)
    assert sorted(p.name for p in entry.iterdir()) == ["ids.npy", "meta.json", "offsets.npy",
                                                       "tokenizer.json"]
    for d, a in zip(docs[:20], ids):                      # the cached encoding = a fresh one
        np.testing.assert_array_equal(a, tok.encode(d))
    assert tk.load(tok.key, bpe_root).encode("def f(x):\n    return x\n").tolist() == \
        tok.encode("def f(x):\n    return x\n").tolist()
    other, _ = _prepare(docs, bpe_root, vocab=600, builds=builds)
    assert other.key != tok.key and builds == [other.key]


def test_bpe_is_deterministic_and_round_trips_held_out_text(corpus_dir, bpe_root, tmp_path):
    docs = _docs(corpus_dir)
    tok, ids = _prepare(docs, bpe_root)
    builds: list[str] = []
    tok2, ids2 = _prepare(docs, tmp_path, builds=builds)           # rebuilt from scratch
    assert builds == [tok.key] and tok2.key == tok.key
    for name in ("tokenizer.json", "ids.npy", "offsets.npy"):
        assert (tmp_path / "tokenizers" / tok.key / name).read_bytes() == \
            (bpe_root / "tokenizers" / tok.key / name).read_bytes()
    _, val, test = text.split_documents(len(docs), val_fraction=0.1, test_fraction=0.1,
                                        split_seed=0)
    for i in val + test:                                          # never seen in training
        assert tok.decode(tok.encode(docs[i])) == docs[i]
    s = _random_text(random.Random(1), 300)
    enc = tok.encode(s)
    assert tok.eod_id not in enc.tolist() and tok.decode(enc) == s


def test_bpe_bundle_uses_the_store_and_names_the_tokenizer(corpus_dir, bpe_root):
    data = text.build(corpus="path", path=str(corpus_dir), tokenizer="bpe", vocab_size=VOCAB,
                      block_size=64, store_root=bpe_root)
    key = data.identity["tokenizer"]
    assert data.num_classes == VOCAB and data.identity["tokenizer_kind"] == "bpe"
    tok = tk.load(key, bpe_root)
    assert int(data.train.x.max()) < VOCAB and (data.train.x == tok.eod_id).any()
    byte = text.build(corpus="path", path=str(corpus_dir), block_size=64, store_root=bpe_root)
    assert byte.identity["corpus_hash"] == data.identity["corpus_hash"]
    assert len(byte.train) > 2 * len(data.train)                # BPE compresses


def test_concurrent_bpe_builds_train_once(corpus_dir, tmp_path):
    """Two processes ask for the same tokenizer at once: one trains, both get the same ids."""
    code = (
        "import sys\nfrom distill_cli.data import text\nfrom distill_cli.data import "
        "tokenizer as tk\ndocs = text.read_corpus('path', sys.argv[1])\n"
        "train = text.split_documents(len(docs), val_fraction=0.1, test_fraction=0.1, "
        "split_seed=0)[0]\ntok, ids = tk.prepare('bpe', documents=docs, train=train, "
        "corpus_hash=text.content_hash(docs), split={'split_seed': 0}, vocab_size=400, "
        "root=sys.argv[2], on_build=lambda k: print('BUILD', flush=True))\n"
        "print(tok.key, sum(int(a.sum()) for a in ids))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(corpus_dir), str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("BUILD") for o in outs) == 1
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir() if p.is_dir()] == \
        [outs[0].split()[-2]]                                      # no staging dir left


def test_damaged_bpe_entry_is_refused(corpus_dir, tmp_path):
    docs = _docs(corpus_dir)[:40]
    tok, _ = _prepare(docs, tmp_path, vocab=300)
    entry = tmp_path / "tokenizers" / tok.key
    ids = entry / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-10])                       # truncated
    with pytest.raises(UserError) as err:
        _prepare(docs, tmp_path, vocab=300)
    assert err.value.key == "store.root" and "ids.npy" in err.value.what
    (entry / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="meta.json"):
        tk.load(tok.key, tmp_path)
    with pytest.raises(UserError) as err:
        tk.load("0123456789abcdef", tmp_path)
    assert err.value.key == "store.root"


# --- corpora and user errors -----------------------------------------------------------------

def test_stdlib_corpus_is_always_there():
    docs = text.read_corpus("stdlib")
    assert len(docs) > 300 and sum(map(len, docs)) > 3_000_000
    assert any("def " in d for d in docs[:10]) and all(d.strip() for d in docs)


@pytest.mark.skipif(not Path("/usr/lib/bible.data").is_file(), reason="bible-kjv not installed")
def test_bible_corpus_one_document_per_chapter():
    docs = text.read_corpus("bible")
    assert len(docs) == 1189 and docs[0].startswith("In the beginning God created")
    assert docs[-1].rstrip().endswith("be with you all. Amen.")


@pytest.mark.skipif(not text.FORTUNES_DIR.is_dir(), reason="fortunes not installed")
def test_fortunes_corpus_one_document_per_fortune():
    docs = text.read_corpus("fortunes")
    assert len(docs) > 1000 and not any(d.startswith("%\n") for d in docs)


def test_missing_corpora_name_the_key_and_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path / "nothing")   # a machine without it
    monkeypatch.setattr(text, "BIBLE_DATA", tmp_path / "bible.data")
    for corpus, package in (("fortunes", "apt-get install -y fortunes"),
                            ("bible", "apt-get install -y bible-kjv")):
        with pytest.raises(UserError) as err:
            text.build(corpus=corpus, store_root=tmp_path)
        assert err.value.key == "dataset.corpus" and package in err.value.fix


def test_bad_paths_and_options_are_user_errors(corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1").mkdir()
    for i in range(3):
        (tmp_path / "latin1" / f"{i}.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "one.txt").write_text("only one paragraph\nof text\n")
    (tmp_path / "paras.txt").write_text("first\n\nsecond para\n  \nthird\n\n\nfourth\n")
    ok = {"corpus": "path", "path": str(corpus_dir), "store_root": tmp_path}
    cases = [({"path": None}, "dataset.path"), ({"path": str(tmp_path / "no")}, "dataset.path"),
             ({"path": str(tmp_path / "empty")}, "dataset.path"),
             ({"path": str(tmp_path / "latin1")}, "dataset.path"),
             ({"path": str(tmp_path / "one.txt")}, "dataset.path"),
             ({"corpus": "wiki"}, "dataset.corpus"), ({"tokenizer": "sp"}, "dataset.tokenizer"),
             ({"tokenizer": "bpe", "vocab_size": 100}, "dataset.vocab_size"),
             ({"block_size": 0}, "dataset.block_size"),
             ({"test_fraction": 0.0}, "dataset.test_fraction"),
             ({"val_fraction": 0.5, "test_fraction": 0.5}, "dataset.test_fraction"),
             ({"limit_train": 0}, "dataset.limit_train"),
             ({"store_root": tmp_path / "one.txt", "tokenizer": "bpe"}, "store.root")]
    for change, key in cases:
        with pytest.raises(UserError) as err:
            text.build(**{**ok, **change})
            pytest.fail(f"{change} was accepted")
        assert err.value.key == key, (change, err.value)
    assert len(text.read_corpus("path", tmp_path / "paras.txt")) == 4


def test_dataset_text_composes_and_builds(corpus_dir, tmp_path):
    cfg = make_cfg(["dataset=text", "dataset.corpus=path", f"dataset.path={corpus_dir}",
                    f"store.root={tmp_path}", "dataset.block_size=48", "dataset.limit_eval=5"])
    data = config_build.build_data(cfg.dataset)
    assert data.input_shape == (1, 48) and data.num_classes == 258 and len(data.val) == 5
