"""The distilled-set file (data/distilled.py), `dataset=distilled`, and the set's grid PNG
(evaluation/image_grid.py): real files, real digits, the real `distill` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from distill_cli import keys
from distill_cli.config.build import build_data
from distill_cli.data import distilled as D
from distill_cli.errors import UserError
from distill_cli.evaluation.image_grid import MIN_CELL, PAD, grid_tensor, save_grid

from conftest import DIGITS, make_cfg

DISTILL = str(Path(sys.executable).parent / "distill")
IPC = 10


@pytest.fixture(scope="module")
def digits():
    """The digits bundle as `dataset=digits` builds it, and its config node (the `source`)."""
    node = make_cfg(["dataset=digits"]).dataset
    return build_data(node), OmegaConf.to_container(node, resolve=True)


def real_set(data, ipc=IPC):
    """The first `ipc` training images of each class, normalised and class-ordered: a
    stand-in "synthetic" set of real images."""
    b = next(iter(data.train.eval_batches(len(data.train))))
    idx = torch.cat([torch.nonzero(b.y == c)[:ipc, 0] for c in range(data.num_classes)])
    return b.x[idx].clone(), b.y[idx].clone()


@pytest.fixture(scope="module")
def set_file(tmp_path_factory, digits):
    data, source = digits
    images, labels = real_set(data)
    path = tmp_path_factory.mktemp("set") / "distilled.pt"
    D.save_distilled(path, images, labels, mean=data.train.mean, std=data.train.std,
                     source=source, num_classes=10, ipc=IPC, lr=0.01, extra={"method": "real"})
    return path, images, labels


def write_raw(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def good_obj(set_file) -> dict:
    return torch.load(set_file[0], weights_only=True)


# --- round trip -------------------------------------------------------------------------------

def test_file_is_a_plain_dict_readable_with_weights_only(set_file):
    obj = torch.load(set_file[0], weights_only=True)
    assert obj["format"] == D.FORMAT and obj["version"] == D.VERSION
    assert obj["images"].dtype == torch.float32 and obj["images"].shape == (100, 1, 8, 8)
    assert obj["labels"].dtype == torch.int64
    assert obj["labels"].tolist() == [c for c in range(10) for _ in range(IPC)]
    assert obj["mean"] == [0.3053] and obj["std"] == [0.3759]
    assert obj["source"]["_target_"] == "distill_cli.data.digits.build"
    assert (obj["num_classes"], obj["ipc"], obj["lr"]) == (10, IPC, 0.01)
    assert obj["extra"] == {"method": "real"}
    assert not [p for p in set_file[0].parent.iterdir() if p.name.endswith(".tmp")]


def test_train_split_is_the_saved_set_and_val_test_are_the_sources(set_file, digits):
    data, _ = digits
    path, images, labels = set_file
    bundle = build_data(make_cfg(["dataset=distilled", f"dataset.path={path}"]).dataset)
    assert len(bundle.train) == 100 and bundle.num_classes == 10
    assert bundle.input_shape == (1, 8, 8) and bundle.name == "distilled-digits"
    # what a training run is fed: the saved images, bit for bit, in any order
    ev = next(iter(bundle.train.eval_batches(1000)))
    assert torch.equal(ev.x, images) and torch.equal(ev.y, labels)
    for batch in bundle.train.train_batches(25, seed=3, epoch=1):
        assert torch.equal(batch.x, images[batch.index]) and torch.equal(batch.y, labels[batch.index])
    for split in ("val", "test"):   # the source's own splits
        ours, theirs = getattr(bundle, split), getattr(data, split)
        assert torch.equal(ours.x, theirs.x) and torch.equal(ours.y, theirs.y)
        assert next(iter(ours.eval_batches(50))).x.equal(next(iter(theirs.eval_batches(50))).x)
    assert bundle.teacher_data.name == "digits"
    assert torch.equal(bundle.teacher_data.train.x, data.train.x)
    assert bundle.identity["source"] == data.identity
    assert bundle.identity["normalization"] == {"mean": [0.3053], "std": [0.3759]}
    moved = bundle.to("cpu")
    assert moved.teacher_data.val is moved.val


def test_identity_follows_the_sets_content(tmp_path, set_file, digits):
    data, source = digits
    path, images, labels = set_file
    other = images.clone()
    other[7, 0, 3, 3] += 1e-3
    p2 = D.save_distilled(tmp_path / "other.pt", other, labels, mean=data.train.mean,
                          std=data.train.std, source=source, num_classes=10, ipc=IPC, lr=0.01)
    a, b = D.load(path=str(path)), D.load(path=str(p2))
    assert a.identity != b.identity and a.identity["set"] != b.identity["set"]
    assert D.load(path=str(path)).identity == a.identity


def test_run_dir_is_accepted_for_its_distilled_pt(set_file):
    assert len(D.load(path=str(set_file[0].parent)).train) == 100


def test_augment_option_flips_the_set(set_file):
    path, images, _ = set_file
    bundle = D.load(path=str(path), augment={"hflip": True})
    flipped = same = 0
    for batch in bundle.train.train_batches(50, seed=0, epoch=0):
        saved = images[batch.index]
        is_same = (batch.x == saved).flatten(1).all(1)
        is_flip = (batch.x == saved.flip(-1)).flatten(1).all(1)
        assert bool((is_same | is_flip).all())
        flipped += int((is_flip & ~is_same).sum())
        same += int((is_same & ~is_flip).sum())
    assert flipped > 10 and same > 10


def test_source_options_can_be_overridden(set_file):
    bundle = D.load(path=str(set_file[0]), limit_eval=20)
    assert len(bundle.val) == 20 and len(bundle.test) == 20 and len(bundle.train) == 100


def test_save_refuses_what_it_could_not_read_back(tmp_path, digits):
    data, source = digits
    images, labels = real_set(data)
    kw = dict(mean=data.train.mean, std=data.train.std, source=source, num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        D.save_distilled(tmp_path / "a.pt", images, labels, ipc=IPC + 1, **kw)
    with pytest.raises(ValueError, match="labels"):
        D.save_distilled(tmp_path / "b.pt", images, labels + 5, ipc=IPC, **kw)
    with pytest.raises(ValueError, match="extra"):
        D.save_distilled(tmp_path / "c.pt", images, labels, ipc=IPC, extra={"x": object()}, **kw)
    with pytest.raises(ValueError, match="source"):
        D.save_distilled(tmp_path / "d.pt", images, labels, ipc=IPC,
                         **{**kw, "source": {"root": "data"}})
    assert not list(tmp_path.iterdir())


# --- bad files --------------------------------------------------------------------------------

def corrupt(obj, **fields):
    return {**obj, **fields}


def _cases(tmp_path: Path, set_file) -> dict:
    good = good_obj(set_file)
    raw = set_file[0].read_bytes()
    (tmp_path / "empty_dir").mkdir()
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all\n" * 10)
    bad_src = dict(good["source"], _target_="os.system")
    nan = good["images"].clone()
    nan[0, 0, 0, 0] = float("nan")
    return {   # case: (path, what the message says)
        "no path": (None, "needs the file"),
        "missing file": (tmp_path / "nope.pt", "does not exist"),
        "dir without a set": (tmp_path / "empty_dir", "directory without"),
        "truncated": (trunc, "cannot be read"),
        "not a torch file": (junk, "cannot be read"),
        "a checkpoint": (write_raw(tmp_path / "ckpt.pt", {"model": {}, "config": {}}),
                         "looks like a training checkpoint"),
        "a tensor": (write_raw(tmp_path / "t.pt", torch.zeros(3)), "not a distilled-set file"),
        "newer version": (write_raw(tmp_path / "v.pt", corrupt(good, version=99)),
                          "format version 99"),
        "labels out of range": (write_raw(tmp_path / "l.pt", corrupt(
            good, labels=good["labels"] + 10)), "labels outside"),
        "NaN image": (write_raw(tmp_path / "n.pt", corrupt(good, images=nan)), "NaN"),
        "lost field": (write_raw(tmp_path / "f.pt", {k: v for k, v in good.items()
                                                       if k != "ipc"}), "lacks ipc"),
        "bad mean": (write_raw(tmp_path / "m.pt", corrupt(good, mean=[0.1, 0.2])), "mean"),
        "source outside the allow-list": (write_raw(tmp_path / "s.pt", corrupt(
            good, source=bad_src)), "not allowed"),
        "source normalised otherwise": (write_raw(tmp_path / "o.pt", corrupt(
            good, mean=[0.5])), "now normalises"),
        "source of another shape": (write_raw(tmp_path / "sh.pt", corrupt(good, source={
            "_target_": "distill_cli.data.fake.build", "shape": [3, 8, 8], "train_size": 50,
            "test_size": 20})), "its source dataset gives"),
        "source is the file itself": (tmp_path / "self.pt", "is the file itself"),
    }


CASES = ["no path", "missing file", "dir without a set", "truncated", "not a torch file",
         "a checkpoint", "a tensor", "newer version", "labels out of range", "NaN image",
         "lost field", "bad mean", "source outside the allow-list", "source normalised otherwise",
         "source of another shape", "source is the file itself"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_a_user_error_naming_dataset_path(tmp_path, set_file, case):
    cases = _cases(tmp_path, set_file)
    assert sorted(cases) == sorted(CASES)
    if case == "source is the file itself":
        self_path = tmp_path / "self.pt"
        write_raw(self_path, corrupt(good_obj(set_file), source={
            "_target_": "distill_cli.data.distilled.load", "path": str(self_path)}))
    path, says = cases[case]
    with pytest.raises(UserError) as info:
        build_data(OmegaConf.create({"_target_": "distill_cli.data.distilled.load",
                                     "path": None if path is None else str(path)}))
    err = info.value
    assert err.key == "dataset.path", err.paragraph()
    assert says in err.what, err.what
    assert err.fix and "\n\n" not in err.paragraph()


def test_source_with_an_interpolation_is_taken_literally(tmp_path, set_file):
    """The file's source node was saved resolved: a `${...}` in it is text, never evaluated."""
    good = good_obj(set_file)
    path = write_raw(tmp_path / "i.pt", corrupt(good, source={
        **good["source"], "root": "${oc.env:HOME}/x"}))
    bundle = D.load(path=str(path))   # digits ignores root; resolving it would not fail either
    assert len(bundle.train) == 100
    with pytest.raises(UserError):   # an unresolvable one does not crash with an OmegaConf error
        D.load(path=str(write_raw(tmp_path / "j.pt", corrupt(good, source={
            **good["source"], "split_seed": "${nothing.here}"}))))


# --- the grid ---------------------------------------------------------------------------------

def test_grid_png_size_and_a_known_image_in_its_cell(tmp_path):
    nc, ipc, mean, std = 4, 3, [0.5], [0.25]
    pixels = torch.full((nc * ipc, 1, 8, 8), 0.5)
    pattern = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2   # checkerboard
    target_c, target_j = 2, 1
    pixels[target_c * ipc + target_j, 0] = pattern.float()
    pixels[0, 0] = 3.0     # clipped to white
    pixels[1, 0] = -2.0    # clipped to black
    images = (pixels - mean[0]) / std[0]
    path = save_grid(tmp_path / "grid.png", images, mean, std, nc, ipc)
    assert path == tmp_path / "grid.png"
    img = Image.open(path)
    cell = 8 * 4   # 8 px upscaled x4 = MIN_CELL
    assert cell == MIN_CELL
    assert img.mode == "RGB" and img.size == (ipc * (cell + PAD) + PAD, nc * (cell + PAD) + PAD)
    a = torch.from_numpy(np.array(img)).long()   # [H, W, 3]
    top, left = PAD + target_c * (cell + PAD), PAD + target_j * (cell + PAD)
    block = a[top:top + cell, left:left + cell]
    want = pattern.repeat_interleave(4, 0).repeat_interleave(4, 1) * 255
    assert torch.equal(block[..., 0], want) and torch.equal(block[..., 2], want)
    assert int(a[PAD + 5, PAD + 5, 0]) == 255 and int(a[PAD + 5, 2 * PAD + cell + 5, 0]) == 0
    assert int(a[PAD + 5, 3 * PAD + 2 * cell + 5, 1]) == 128   # 0.5 -> 127.5 + 0.5
    assert bool((a[0] == 255).all()) and bool((a[:, left - 1] == 255).all())   # padding
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_grid_tensor_colour_channels_and_signals():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.2, 0.2]
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    images = (red - torch.tensor(mean).view(1, 3, 1, 1)) / 0.2
    g = grid_tensor(images, mean, std, 2, 1)
    assert g.shape == (3, 2 * (32 + PAD) + PAD, 32 + 2 * PAD)
    assert torch.allclose(g[:, PAD + 3, PAD + 3], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    sig = grid_tensor(torch.zeros(3, 1, 40), [0.0], [1.0], 3, 1)   # [N, C, L] signals
    assert sig.shape == (3, 3 * (32 + PAD) + PAD, 40 + 2 * PAD)
    one = grid_tensor(torch.zeros(1, 1, 8, 8), [0.0], [1.0], 1, 1)  # padded like the others
    assert one.shape == (3, 32 + 2 * PAD, 32 + 2 * PAD)
    with pytest.raises(ValueError):
        grid_tensor(torch.zeros(5, 1, 8, 8), [0.0], [1.0], 2, 3)


# --- the CLI ----------------------------------------------------------------------------------

def distill(*args, tmp_path: Path, timeout=600):
    env = {**os.environ, "DISTILL_OUTPUTS": str(tmp_path / "outputs"), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([DISTILL, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, set_file):
    """`distill dataset=distilled ... teacher=cnn loss=kd`, 1 epoch, a fresh teacher store."""
    tmp = tmp_path_factory.mktemp("kd")
    run_dir, store = tmp / "run", tmp / "store"
    args = [a for a in DIGITS if not a.startswith(("dataset=", "trainer.batch_size",
                                                    "trainer.epochs"))]
    proc = distill(*args, "dataset=distilled", f"dataset.path={set_file[0]}", "teacher=cnn",
                   "loss=kd", "student=mlp", "trainer.epochs=1", "trainer.batch_size=25",
                   "teacher.train.epochs=1", "teacher.train.batch_size=64",
                   f"store.root={store}", f"hydra.run.dir={run_dir}", tmp_path=tmp)
    return proc, run_dir, store


def test_kd_run_on_a_distilled_set(kd_run):
    proc, run_dir, _ = kd_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[keys.STATUS] == "finished" and summary[keys.DATASET] == "distilled-digits"
    assert 0.0 <= summary[keys.BEST_TEST_ACC1] <= 100.0


def test_kd_teacher_from_the_store_learns_the_source_data(kd_run, digits):
    """The store trains the teacher on digits (1,293 images), not on the 100-image set: its
    entry is keyed on, and records, the source data."""
    proc, _, store = kd_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [json.loads(p.read_text()) for p in (store / "teachers").glob("*/entry.json")]
    assert len(entries) == 1
    assert entries[0]["dataset"] == "digits", entries[0]["dataset"]
    assert entries[0]["description"]["data"]["sizes"]["train"] == 1293
    # keyed exactly as a `dataset=digits` run's teacher: the two share one stored teacher
    assert entries[0]["description"]["data"] == digits[0].identity


def test_numpy_scalars_are_stored_as_plain_numbers(tmp_path, digits):
    data, source = digits
    images, labels = real_set(data, ipc=1)
    path = D.save_distilled(tmp_path / "np.pt", images, labels, mean=np.array([0.3053]),
                            std=[np.float64(0.3759)], source=source, num_classes=10, ipc=1,
                            lr=np.float32(0.5), extra={"acc": np.float64(1.5), "n": np.int64(3)})
    obj = torch.load(path, weights_only=True)
    assert obj["extra"] == {"acc": 1.5, "n": 3} and type(obj["extra"]["n"]) is int
    assert obj["lr"] == 0.5 and len(D.load(path=str(path)).train) == 10


def test_cli_missing_file_exits_2_naming_dataset_path(tmp_path):
    args = [a for a in DIGITS if not a.startswith("dataset=")]
    proc = distill(*args, "dataset=distilled", f"dataset.path={tmp_path}/none.pt", "student=mlp",
                   "loss=ce", f"hydra.run.dir={tmp_path}/run", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset.path" in proc.stderr and "Traceback" not in proc.stderr
