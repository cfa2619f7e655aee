"""A distilled dataset file (what `task=dataset_distill` writes) and `dataset=distilled`.

The file (`save_distilled`) is a plain dict saved with `torch.save` and read with
`torch.load(weights_only=True)` (no code runs on load):

    format "distill_cli.distilled" · version · images float32 [N, C, H, W] in the SOURCE dataset's
    NORMALISED space, class-ordered (class c at rows c*ipc:(c+1)*ipc) · labels int64 [N] ·
    mean / std (the source's per-channel statistics: pixels = images * std + mean) ·
    source (the source dataset's config node: `_target_` and options) · num_classes · ipc ·
    lr (MTT's learned step size, or None) · extra (plain metadata from the writer)

`dataset=distilled dataset.path=<run>/distilled.pt` (`load`) gives a `DataBundle` whose TRAIN
split is the synthetic set and whose val/test splits are the source's own (the source is rebuilt
from `source` by the runner's own dataset builder its `_target_` names — `distill_cli.data.BUILDERS`
and nothing else: a file is data, never a way to run code). The train split holds the images as float32 with mean 0 / std 1: `normalize`
computes `(x - 0) / 1`, so a batch is the saved images bit for bit, and code that rebuilds the
split from its `mean`/`std` (data/unlabeled.py) keeps it exact. `teacher_data` is the source
bundle: a teacher the store trains for a run on the set learns the real data, not the set.
"""
from __future__ import annotations

import contextvars
import hashlib
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DATA_VERSION, DataBundle, InMemorySplit
from distill_cli.data.unlabeled import RUN_KEYS
from distill_cli.errors import UserError
from distill_cli.io import atomic_write_bytes

FORMAT = "distill_cli.distilled"
VERSION = 1
DEFAULT_NAME = "distilled.pt"   # what a dataset-distillation run writes in its run dir
KEY = "dataset.path"
_FIELDS = ("images", "labels", "mean", "std", "source", "num_classes", "ipc")
# the files being loaded by this call chain: a file whose source is (eventually) itself is refused
_LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("distilled", default=())


# --- writing ----------------------------------------------------------------------------------

def _plain(value, where: str):
    """`value` as types `torch.load(weights_only=True)` reads back; ValueError otherwise."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    # numpy scalars (np.float64 subclasses float) would pickle as numpy objects, which
    # weights_only refuses: stored as the plain python value
    if value is None or isinstance(value, str):
        return None if value is None else str(value)
    if isinstance(value, (bool, numbers.Integral)) and not isinstance(value, torch.Tensor):
        return bool(value) if isinstance(value, bool) else int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where}: {type(value).__name__} cannot be stored in a distilled-set file")


def save_distilled(path, images: torch.Tensor, labels: torch.Tensor, *, mean, std, source,
                   num_classes: int, ipc: int, lr=None, extra: dict | None = None) -> Path:
    """Write the set to `path` atomically (a reader never sees half a file); returns the path.
    Wrong shapes are the caller's bug (ValueError), checked here so no unreadable file is ever
    written."""
    images = images.detach().to("cpu", torch.float32).contiguous().clone()
    labels = labels.detach().to("cpu", torch.int64).contiguous().clone()
    n, c = images.shape[0], images.shape[1] if images.dim() > 1 else 0
    if images.dim() not in (3, 4) or labels.shape != (n,):
        raise ValueError(f"images [N, C, H, W] and labels [N] expected, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if n != int(num_classes) * int(ipc):
        raise ValueError(f"{n} images but num_classes*ipc = {num_classes}*{ipc}")
    if n and not 0 <= int(labels.min()) <= int(labels.max()) < int(num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} channel values, got {len(mean)}/{len(std)}")
    source = _plain(source, "source")
    if not isinstance(source, dict) or not isinstance(source.get("_target_"), str):
        raise ValueError("source must be the source dataset's config node (with `_target_`)")
    obj = {"format": FORMAT, "version": VERSION, "images": images, "labels": labels,
           "mean": mean, "std": std, "source": source, "num_classes": int(num_classes),
           "ipc": int(ipc), "lr": None if lr is None else float(lr),
           "extra": _plain(dict(extra or {}), "extra")}
    path = Path(path)
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))
    return path


# --- reading ----------------------------------------------------------------------------------

def _error(what: str, fix: str) -> UserError:
    return UserError(what, KEY, fix)


_REMAKE = ("Point dataset.path at the distilled.pt a `task=dataset_distill` run wrote "
           "(<run>/distilled.pt or <run>/distilled_last.pt), or rerun that run to write it again")


def _resolve_path(path) -> Path:
    if path is None or str(path).strip() in ("", "???"):
        raise _error("dataset=distilled needs the file of a distilled set", "Pass dataset.path="
                     "<run>/distilled.pt (written by a `task=dataset_distill` run)")
    p = Path(str(path)).expanduser()
    if p.is_dir():   # a run dir: its best set
        if not (p / DEFAULT_NAME).is_file():
            raise _error(f"{p} is a directory without a {DEFAULT_NAME}", _REMAKE)
        p = p / DEFAULT_NAME
    if not p.is_file():
        raise _error(f"The distilled-set file {p} does not exist", _REMAKE)
    return p


def read_distilled(path) -> dict:
    """The file's dict, checked field by field; any problem is a UserError naming dataset.path."""
    p = _resolve_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as exc:   # no permission, an I/O error
        raise _error(f"{p} cannot be read ({type(exc).__name__}: {exc.strerror or exc})",
                     "Make the file readable, or point dataset.path at a readable copy") from None
    except Exception as exc:   # truncated zip, random bytes, pickled code
        raise _error(f"{p} cannot be read as a distilled-set file (corrupted or not a torch "
                     f"file: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                     _REMAKE) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        looks = (" (it looks like a training checkpoint)" if isinstance(obj, dict)
                 and "model" in obj else "")
        raise _error(f"{p} is not a distilled-set file{looks}", _REMAKE)
    if obj.get("version") != VERSION:
        raise _error(f"{p} is a distilled-set file of format version {obj.get('version')!r}, "
                     f"but this distill_cli reads version {VERSION}",
                     "Use the distill_cli version that wrote it, or distil the set again")
    problem = _problem(obj)
    if problem:
        raise _error(f"{p} is a corrupted distilled-set file ({problem})", _REMAKE)
    obj["path"] = str(p.resolve())
    return obj


def _problem(obj: dict) -> str | None:
    """Why the fields are not what `save_distilled` writes, or None."""
    missing = [k for k in _FIELDS if k not in obj]
    if missing:
        return f"it lacks {', '.join(missing)}"
    x, y, nc, ipc = obj["images"], obj["labels"], obj["num_classes"], obj["ipc"]
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() not in (3, 4):
        return "images are not a float32 [N, C, H, W] tensor"
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        return "labels are not int64 [N]"
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (nc, ipc)):
        return "num_classes / ipc are not positive integers"
    if x.shape[0] != nc * ipc:
        return f"{x.shape[0]} images, not num_classes*ipc = {nc}*{ipc}"
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < nc:
        return f"labels outside [0, {nc})"
    if not bool(torch.isfinite(x).all()):
        return "images hold NaN or infinite values"
    for k in ("mean", "std"):
        v = obj[k]
        if not isinstance(v, list) or len(v) != x.shape[1] or not all(
                isinstance(s, (int, float)) and math.isfinite(s) for s in v):
            return f"{k} is not {x.shape[1]} finite numbers"
    if not all(s > 0 for s in obj["std"]):
        return "std is not positive"
    src = obj["source"]
    if not isinstance(src, dict) or not isinstance(src.get("_target_"), str):
        return "source is not a dataset config node with `_target_`"
    lr = obj.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or not math.isfinite(lr)):
        return "lr is not a finite number"
    return None


def _builder(target) -> tuple[str, object]:
    """The in-package dataset builder a source's `_target_` names (`distill_cli.data.BUILDERS`,
    the only datasets a distilled-set file may name: a file is data, never a way to run code)."""
    from distill_cli.data import BUILDERS

    for name, spec in BUILDERS.items():
        module, func = spec.split(":")
        if target == f"{module}.{func}":
            return name, spec
    raise _error(f"its source dataset's `_target_` {target!r} is not allowed: a distilled-set "
                 f"file may only name the runner's own datasets ({', '.join(BUILDERS)})",
                 _REMAKE)


def _build_source(obj: dict, overrides: dict) -> DataBundle:
    from distill_cli.data import build_dataset   # the package face imports this module

    node = {**obj["source"], **{k: v for k, v in overrides.items() if v is not None}}
    name, _ = _builder(node.pop("_target_", None))
    for key in RUN_KEYS:   # read by the runner, never by a builder
        node.pop(key, None)
    chain = _LOADING.get()
    if obj["path"] in chain:
        raise _error(f"{obj['path']}'s source dataset is the file itself (through "
                     f"{' -> '.join(chain)})", _REMAKE)
    token = _LOADING.set(chain + (obj["path"],))
    try:
        return build_dataset(name, **node)
    except UserError as err:   # the source data is not available here
        fix = err.fix or ""
        if "root" in node:
            fix += ("; if the source data lives elsewhere on this machine, pass "
                    "dataset.root=<its folder>")
        raise _error(f"The source dataset of {obj['path']} ({name}) cannot be built: "
                     f"{err.what}", fix.lstrip("; ")) from None
    except (TypeError, ValueError) as err:   # options the builder does not take or understand
        raise _error(f"The source dataset of {obj['path']} ({name}) cannot be built from the "
                     f"options the file records: {err}", _REMAKE) from None
    finally:
        _LOADING.reset(token)


def _check_match(obj: dict, src: DataBundle) -> None:
    shape = tuple(obj["images"].shape[1:])
    if tuple(src.input_shape) != shape or src.num_classes != obj["num_classes"]:
        raise _error(f"{obj['path']} holds {obj['num_classes']} classes of {list(shape)} inputs "
                     f"but its source dataset gives {src.num_classes} of {list(src.input_shape)}",
                     _REMAKE)
    mean, std = getattr(src.train, "mean", None), getattr(src.train, "std", None)
    if mean is not None and std is not None and not all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
            for a, b in zip(list(mean) + list(std), obj["mean"] + obj["std"])):
        # the images are in the source's normalised space: other statistics change their meaning
        raise _error(f"{obj['path']} was distilled in a space normalised by mean {obj['mean']} / "
                     f"std {obj['std']}, but its source dataset now normalises with "
                     f"{list(mean)} / {list(std)}", "Build the source dataset with the options "
                     "the distillation run used, or distil the set again")


def content_hash(obj: dict) -> str:
    """What the set holds (images, labels, lr): part of the bundle's identity, so stored teacher
    outputs of one set are never served for another."""
    h = hashlib.sha256()
    for t in (obj["images"], obj["labels"]):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(repr(obj.get("lr")).encode())
    return h.hexdigest()[:16]


def load(path=None, root=None, download=None, val_fraction=None, split_seed=None,
         limit_train=None, limit_eval=None, augment=None) -> DataBundle:
    """`dataset=distilled`: train on the set, validate and test on the source's splits.
    `root` ... `limit_eval`, when not None, replace the source's recorded options (the data's
    folder on this machine; a smaller val/test for a smoke run)."""
    obj = read_distilled(path)
    aug = AugmentSpec.from_config(augment)
    src = _build_source(obj, {"root": root, "download": download, "val_fraction": val_fraction,
                              "split_seed": split_seed, "limit_train": limit_train,
                              "limit_eval": limit_eval})
    _check_match(obj, src)
    c = obj["images"].shape[1]
    # mean 0 / std 1: the images already are network inputs, and (x - 0) / 1 is exact
    train = InMemorySplit(obj["images"], obj["labels"], mean=(0.0,) * c, std=(1.0,) * c,
                          augment=aug)
    identity = {"name": "distilled", "data_version": DATA_VERSION, "format_version": VERSION,
                "set": content_hash(obj), "num_classes": obj["num_classes"], "ipc": obj["ipc"],
                "learned_lr": obj.get("lr"),
                "input_shape": list(src.input_shape), "augment": aug.as_dict(),
                "sizes": {"train": len(train), "val": len(src.val), "test": len(src.test)},
                # how raw source pixels become inputs (export reads it): the source's
                "normalization": {"mean": obj["mean"], "std": obj["std"]},
                "source": src.identity}
    return DataBundle(name=f"distilled-{src.name}", train=train, val=src.val, test=src.test,
                      num_classes=src.num_classes, input_shape=tuple(src.input_shape),
                      identity=identity, class_names=src.class_names,
                      teacher_data=src.teacher_data or src)
