"""Issue #18 (2): the teacher store, the teacher-output store and image folders survive bad and
corrupt input — a broken entry is refused with the command that removes it (and listed, marked,
among the good ones), a damaged stored teacher is caught before it teaches, a table with any bad
row is rebuilt, corrupt images are named before training — and listing never creates anything."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_cli.config import build
from distill_cli.data import build_dataset
from distill_cli.data.imagefolder import CorruptImage
from distill_cli.errors import UserError
from distill_cli.numerics import autocast
from distill_cli.teachers import build as teacher_build
from distill_cli.teachers.outputs import TeacherOutputs, _checksum
from distill_cli.teachers.store import Store
from distill_cli.training.run import run

from conftest import DIGITS, make_cfg
from test_cli import distill
from test_reliability_checkpoints import snapshot

TEACHERS = str(Path(sys.executable).parent / "distill-teachers")
# the B with a stored teacher: a 1-epoch MLP teacher, trained once per module
KD = ["dataset=digits", "student=mlp", "trainer.epochs=1", "logger=none", "teacher=mlp",
      "loss=kd", "teacher.train.epochs=1", "trainer.channels_last=false"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store root holding one teacher (and its output tables), built once."""
    home = tmp_path_factory.mktemp("template") / "home"
    run(make_cfg(KD + [f"store.root={home}"]), home.parent / "run", tty=False)
    return home


@pytest.fixture
def home(template, tmp_path) -> Path:
    """A private copy of the template store."""
    shutil.copytree(template, tmp_path / "home")
    return tmp_path / "home"


def the_entry(home: Path) -> Path:
    [entry] = [p for p in (home / "teachers").iterdir() if p.is_dir() and
               not p.name.startswith(".")]
    return entry


def teachers_cli(*args, home: Path | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILL_HOME": str(home)}
    return subprocess.run([TEACHERS, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def refused_run(home: Path, tmp_path: Path, key: str = "teacher") -> str:
    """`distill KD` on `home`: exit 2, no traceback, `key` named, the store untouched."""
    before = snapshot(home)
    proc = distill(*KD, f"hydra.run.dir={tmp_path / 'r'}", tmp_path=tmp_path,
                   env={"DISTILL_HOME": str(home)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and f"`{key}`" in proc.stderr, out[-3000:]
    assert snapshot(home) == before
    return "".join(proc.stderr.split())   # errors.py wraps long paths at their hyphens


# ------------------------------------------------------------------ teacher store metadata

def test_an_entry_json_of_empty_dict_is_refused_with_the_prune_command(home, tmp_path):
    entry = the_entry(home)
    (entry / "entry.json").write_text("{}")
    msg = refused_run(home, tmp_path)
    assert str(entry / "entry.json") in msg
    assert f"distill-teachersprune{entry.name}" in msg
    # the advice works: prune removes it, and the next run trains the teacher again
    pruned = teachers_cli("prune", entry.name, home=home)
    assert pruned.returncode == 0 and entry.name in pruned.stdout, pruned.stderr
    summary = run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "again", tty=False)
    assert summary["teacher/store_hit"] is False and summary["teacher/key"] == entry.name


@pytest.mark.parametrize("content", ["[1, 2]", "", "not json", '{"test_acc1": "high"}',
                                     "KEY"])
def test_any_broken_entry_json_is_refused(home, tmp_path, content):
    entry = the_entry(home)
    if content == "KEY":   # good metadata under another entry's key
        meta = json.loads((entry / "entry.json").read_text())
        content = json.dumps({**meta, "key": "0123456789abcdef"})
    (entry / "entry.json").write_text(content)
    before = snapshot(home)
    with pytest.raises(UserError) as info:
        run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "r", tty=False)
    err = info.value
    assert err.key == "teacher" and str(entry / "entry.json") in err.what
    assert f"prune {entry.name}" in err.fix
    assert snapshot(home) == before


def test_list_marks_the_broken_entry_and_lists_the_rest(home):
    good = the_entry(home)
    other = good.parent / "00000000deadbeef"   # a second good entry (metadata under its key)
    shutil.copytree(good, other)
    meta = json.loads((other / "entry.json").read_text())
    (other / "entry.json").write_text(json.dumps({**meta, "key": other.name}))
    (good / "entry.json").write_text("{}")
    before = snapshot(home)
    listing = teachers_cli("list", home=home)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if good.name in line
            or other.name in line]
    assert any(other.name in r and "mlp" in r and "digits" in r for r in rows), listing.stdout
    assert any(good.name in r and "BROKEN" in r for r in rows), listing.stdout
    assert f"distill-teachers prune {good.name}" in listing.stdout
    assert "1 teacher(s)" in listing.stdout
    assert snapshot(home) == before
    assert teachers_cli("prune", good.name, home=home).returncode == 0
    assert [m["key"] for m in Store(home, "teachers").entries()] == [other.name]
    assert "BROKEN" not in teachers_cli("list", home=home).stdout


def test_root_that_is_a_file_is_a_user_error(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args in (["--root", str(a_file), "list"], ["--root", str(a_file), "prune"]):
        proc = teachers_cli(*args, home=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "`--root`" in proc.stderr and str(a_file) in proc.stderr
    proc = distill(*KD, f"store.root={a_file}", f"hydra.run.dir={tmp_path / 'r'}",
                   tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "`store.root`" in proc.stderr and a_file.read_text() == "x"


def test_list_and_prune_on_a_new_root_create_nothing(tmp_path):
    root = tmp_path / "new"
    listing = teachers_cli("--root", str(root), "list", home=tmp_path)
    assert listing.returncode == 0 and "0 teacher(s)" in listing.stdout, listing.stderr
    assert teachers_cli("--root", str(root), "prune", home=tmp_path).returncode == 0
    assert teachers_cli("--root", str(root), "prune", "abc", home=tmp_path).returncode == 2
    assert not root.exists()


# ------------------------------------------------------------------ stored teacher weights

def test_an_emptied_stored_best_pt_is_refused_with_the_prune_command(home, tmp_path):
    entry = the_entry(home)
    (entry / "checkpoints" / "best.pt").write_bytes(b"")
    msg = refused_run(home, tmp_path)
    assert str(entry / "checkpoints" / "best.pt") in msg and "empty" in msg
    assert f"distill-teachersprune{entry.name}" in msg


def _rewrite_weights(entry: Path, change) -> None:
    path = entry / "checkpoints" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: change(v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)


def test_a_stored_teacher_with_nan_weights_is_refused(home, tmp_path):
    entry = the_entry(home)
    _rewrite_weights(entry, lambda v: torch.full_like(v, float("nan")))
    msg = refused_run(home, tmp_path)
    assert "non-finite" in msg and f"distill-teachersprune{entry.name}" in msg


def test_a_stored_teacher_that_misses_its_record_is_refused(home, tmp_path):
    """Finite weights that are not the stored teacher's (it would teach at chance level)."""
    entry = the_entry(home)
    torch.manual_seed(1)
    _rewrite_weights(entry, lambda v: torch.randn_like(v))
    with pytest.raises(UserError) as info:
        run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "r", tty=False)
    err = info.value
    assert err.key == "teacher" and "its entry records" in err.what and "prune" in err.fix


def test_the_record_check_runs_once_per_best_pt(home, tmp_path, monkeypatch):
    """The test pass is paid once: its success is recorded by best.pt's hash; new weights (a
    changed hash) are checked again."""
    calls = []
    real = teacher_build.predict
    monkeypatch.setattr(teacher_build, "predict",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    entry = the_entry(home)
    (entry / "verified.json").unlink(missing_ok=True)
    first = run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "a", tty=False)
    assert first["teacher/store_hit"] is True and len(calls) == 1
    marker = json.loads((entry / "verified.json").read_text())
    assert marker["test_acc1"] == pytest.approx(first["teacher/test/acc1"])
    run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "b", tty=False)
    assert len(calls) == 1
    _rewrite_weights(entry, lambda v: v * 0)   # other weights: checked (and refused) again
    with pytest.raises(UserError):
        run(make_cfg(KD + [f"store.root={home}"]), tmp_path / "c", tty=False)
    assert len(calls) == 2


# ------------------------------------------------------------------ teacher-output tables

# more rows than the 4,096 the old checksum sampled
MANY = ["dataset=fake", "dataset.shape=[1,4,4]", "dataset.train_size=6000",
        "dataset.test_size=50", "dataset.num_classes=5"]


@pytest.fixture(scope="module")
def many():
    cfg = make_cfg(MANY + ["student=mlp"])
    data = build.build_data(cfg.dataset)
    torch.manual_seed(0)
    return data, build.build_model(cfg.student, "student", data).eval()


def outputs(data, teacher, root) -> TeacherOutputs:
    return TeacherOutputs(teacher=teacher, teacher_id={"test": 1}, data=data,
                          row_shape=(data.num_classes,), batch_size=64, data_seed=0,
                          device=torch.device("cpu"),
                          autocast=lambda: autocast(torch.device("cpu"), "32"), root=root)


def _unsampled_row(n: int) -> int:
    """A row the old 4,096-row checksum never read."""
    sampled = set(np.unique(np.linspace(0, n - 1, 4096).astype(np.int64)).tolist())
    return next(i for i in range(n) if i not in sampled)


def test_a_nan_row_anywhere_gets_the_table_rebuilt(tmp_path, many):
    data, teacher = many
    first = outputs(data, teacher, tmp_path)
    good = first.train_table(1).clone()
    npy = first.dir / "train.npy"
    row = _unsampled_row(len(data.train))
    arr = np.load(npy)
    arr[row] = np.nan
    np.save(npy, arr)
    again = outputs(data, teacher, tmp_path)
    assert torch.equal(again.train_table(1), good) and again.built == ["train"]
    # a NaN table whose metadata was rewritten to match it: refused for the NaN itself
    arr = np.load(npy)
    arr[row] = np.nan
    np.save(npy, arr)
    meta_path = first.dir / "train.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "checksum": _checksum(np.load(npy))}))
    third = outputs(data, teacher, tmp_path)
    assert torch.equal(third.train_table(1), good) and third.built == ["train"]
    assert bool(torch.isfinite(third.train_table(1)).all())


@pytest.mark.parametrize("meta", ["{}", "[1, 2]", '"text"', "", "old", "shape"])
def test_any_metadata_error_rebuilds_the_table(tmp_path, many, meta):
    data, teacher = many
    first = outputs(data, teacher, tmp_path)
    good = first.train_table(1).clone()
    path = first.dir / "train.json"
    real = json.loads(path.read_text())
    if meta == "old":   # written before whole-table hashing: verified on a sample only
        text = json.dumps({k: v for k, v in real.items() if k != "hash"})
    elif meta == "shape":   # a self-consistent table of another row count
        small = np.zeros((3, 5), np.float32)
        np.save(first.dir / "train.npy", small)
        text = json.dumps({**real, "shape": [3, 5], "checksum": _checksum(small)})
    else:
        text = meta
    path.write_text(text)
    again = outputs(data, teacher, tmp_path)
    assert torch.equal(again.train_table(1), good) and again.built == ["train"]
    assert json.loads(path.read_text()) == real   # rewritten as the builder writes it


def test_a_teacher_with_nan_outputs_stores_nothing(tmp_path, many):
    data, _ = many
    bad = build.build_model(make_cfg(MANY + ["student=mlp"]).student, "student", data).eval()
    with torch.no_grad():
        next(bad.parameters()).fill_(float("nan"))
    store = outputs(data, bad, tmp_path)
    with pytest.raises(UserError) as info:
        store.train_table(1)
    assert info.value.key == "teacher" and "non-finite" in info.value.what
    assert not (store.dir / "train.npy").exists() and not (store.dir / "train.json").exists()


def test_a_run_on_a_corrupt_table_matches_the_run_on_a_good_one(tmp_path, monkeypatch):
    """End to end (the issue's case): NaN in a stored row the old sample never read is rebuilt,
    and the student ends exactly where it would have."""
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    cfg = DIGITS + MANY + ["student=mlp", "teacher=mlp", "loss=kd", "trainer.epochs=1",
                           "teacher.train.epochs=1", "trainer.batch_size=256"]
    first = run(make_cfg(cfg), tmp_path / "a", tty=False)
    npy = Path(first["teacher/outputs_dir"]) / "train.npy"
    arr = np.load(npy)
    arr[_unsampled_row(len(arr))] = np.nan
    np.save(npy, arr)
    second = run(make_cfg(cfg), tmp_path / "b", tty=False)
    assert second["teacher/outputs_hit_rate"] < 1
    assert second["best/test/acc1"] == first["best/test/acc1"]
    assert bool(np.isfinite(np.load(npy)).all())


# ------------------------------------------------------------------ image folders

def _images(root: Path, classes=("cat", "dog"), n_train=5, n_test=2, fmt="png") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / c / f"{i}.{fmt}")
    return root


def test_a_corrupt_image_is_named_before_training(tmp_path):
    root = _images(tmp_path / "img")
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CorruptImage) as info:
        build_dataset("imagefolder", root=str(root), image_size=8, num_workers=0)
    assert info.value.key == "dataset.root" and str(bad) in info.value.what
    assert "skip_corrupt" in info.value.fix


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_images_are_caught_up_front(tmp_path, fmt):
    from PIL import Image

    root = _images(tmp_path / "img", fmt=fmt)
    big = root / "val" / "cat" / f"0.{fmt}"   # big enough that half of it is no image
    px = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(px).save(big)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(CorruptImage) as info:
        build_dataset("imagefolder", root=str(root), image_size=8, in_memory=True)
    assert str(big) in info.value.what


def test_skip_corrupt_leaves_them_out_and_counts_them(tmp_path):
    root = _images(tmp_path / "img")
    clean = build_dataset("imagefolder", root=str(root), image_size=8, val_fraction=0.0,
                          in_memory=True)
    (root / "train" / "dog" / "3.png").write_bytes(b"")
    (root / "val" / "cat" / "1.png").write_bytes(b"junk")
    b = build_dataset("imagefolder", root=str(root), image_size=8, val_fraction=0.0,
                      in_memory=True, skip_corrupt=True)
    assert (len(b.train), len(b.test)) == (len(clean.train) - 1, len(clean.test) - 1)
    assert b.identity["left_out_corrupt"]["count"] == 2
    assert "left_out_corrupt" not in clean.identity
    keep = [i for i in range(len(clean.train)) if i != 8]   # dog/3 = 5 cats + 3 dogs in
    assert torch.equal(b.train.x, clean.train.x[keep])
    assert b.train.targets.tolist() == clean.train.targets[keep].tolist()


def test_skip_corrupt_refuses_a_class_left_without_training_images(tmp_path):
    root = _images(tmp_path / "img", n_train=2)
    for f in (root / "train" / "dog").iterdir():
        f.write_bytes(b"")
    with pytest.raises(UserError) as info:
        build_dataset("imagefolder", root=str(root), image_size=8, val_fraction=0.0,
                      skip_corrupt=True)
    assert info.value.key == "dataset.root" and "class dog" in info.value.what


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _images(tmp_path / "img")
    (root / "train" / "emu").mkdir()
    with pytest.raises(UserError) as info:
        build_dataset("imagefolder", root=str(root), image_size=8)
    assert info.value.key == "dataset.root" and "emu" in info.value.what
    assert "no images" in info.value.what


def test_an_image_that_breaks_mid_run_stops_it_with_its_path(tmp_path):
    """Checked up front, then damaged (or never checked): the DataLoader worker's failure
    reaches the user as one paragraph naming the file."""
    root = _images(tmp_path / "img")
    b = build_dataset("imagefolder", root=str(root), image_size=8, num_workers=1,
                      val_fraction=0.0)
    bad = root / "train" / "cat" / "2.png"
    bad.write_bytes(b"gone")
    with pytest.raises(CorruptImage) as info:
        list(b.train.eval_batches(4))   # every sample (a training epoch drops the last)
    err = info.value
    assert err.key == "dataset.root" and str(bad) in err.what
    assert "Traceback" not in err.paragraph() and "Config key" not in err.what


def test_the_cli_refuses_a_corrupt_folder_and_runs_with_skip_corrupt(tmp_path):
    root = _images(tmp_path / "img", n_train=8)
    (root / "train" / "cat" / "1.png").write_bytes(b"")
    args = ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8",
            "dataset.num_workers=0", "dataset.val_fraction=0.25", "student=mlp",
            "trainer.epochs=1", "trainer.batch_size=4", "logger=none"]
    proc = distill(*args, f"hydra.run.dir={tmp_path / 'a'}", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "`dataset.root`" in proc.stderr and "1.png" in proc.stderr
    proc = distill(*args, "dataset.skip_corrupt=true", f"hydra.run.dir={tmp_path / 'b'}",
                   tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out 1 corrupt image" in proc.stderr
