"""The teacher-output store: a frozen teacher's logits computed once, then served by index.

Training batches are a pure function of (data_seed, epoch, step) — order and augmentation — so
the teacher's logits for every training sample of epoch e are a pure function of (teacher, data,
data_seed, batch size, e). Without augmentation they do not depend on the epoch at all. Each such
table is computed once (one inference pass over exactly the batches training will see), written
atomically next to the teacher store, and reused by every run that shares it: a sweep of ten
losses x three seeds with a fixed `data_seed` pays for the teacher once.

Layout: `<store.root>/outputs/<key>/<table>.npy` + `<table>.json` (shape, dtype, SHA-256 of the
whole table). A table is used only when its JSON is well-formed, its shape is the one this run
needs, the hash of every row matches and every value is finite; anything else is rebuilt, never
used. Verifying costs little next to computing: ~25 ms for a 50,000 x 100 float32 table (20 MiB;
about 500 MB/s hashed, 2 ms for the finite scan), against ~6 s for just 5,000 rows of a resnet8
teacher on one core (measured 2026-11-30). Tables: `train` (no augmentation) or `train_e<epoch>`,
and the evaluation splits `val` / `test`.

A task may store a compact form of the teacher's outputs (`Task.stored_signal`: the LM task's
packed top-k rows): `transform` maps the teacher's logits to that form before the dtype rounds
them, stored and live alike (teachers/topology.py `frozen_logits`), and its `identity` joins
the key. Such a store holds only the training tables: the evaluation references stay dense and
are computed live (`serves_eval` False), once a run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omegaconf import DictConfig, OmegaConf

from distill_cli import keys
from distill_cli.config.build import model_node
from distill_cli.data.bundle import HeldSplit
from distill_cli.data.mixing import MixSpec, training_batches
from distill_cli.errors import UserError
from distill_cli.losses.base import OnlineObjective, StepObjective
from distill_cli.numerics import autocast, quantise
from distill_cli.teachers.store import Store, content_key
from distill_cli.io import atomic_write_bytes, read_json, sha256_file, write_json

FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
HASH = "sha256-all-rows"   # tables hashed before this were checked on a 4,096-row sample only


def _checksum(arr: np.ndarray) -> str:
    """SHA-256 of the shape, dtype and every byte of the table, streamed in slices (a memory
    map is read once, never copied whole)."""
    h = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    flat = arr.reshape(-1)
    step = max(1, (8 << 20) // max(arr.itemsize, 1))
    for i in range(0, flat.size, step):
        h.update(np.ascontiguousarray(flat[i:i + step]).view(np.uint8))
    return h.hexdigest()


def _problem(arr: np.ndarray, meta, shape: list[int], dtype: str) -> str | None:
    """Why a stored table may not be served, or None."""
    if not isinstance(meta, dict) or meta.get("hash") != HASH:
        return "its metadata is malformed or from an older format"
    if list(arr.shape) != shape or meta.get("shape") != shape:
        return f"shape {list(arr.shape)} is not {shape}"
    if str(arr.dtype) != dtype or meta.get("dtype") != dtype:
        return f"dtype {arr.dtype} is not {dtype}"
    if _checksum(arr) != meta.get("checksum"):
        return "its content does not match its checksum"
    if not bool(np.isfinite(arr).all()):
        return "it holds non-finite values"
    return None


class TableStore:
    """Tables of rows computed once and served by index: `<root>/outputs/<key>/<name>.npy` +
    `<name>.json` (shape, dtype, SHA-256 of every row). A table is served only when its JSON is
    well-formed, its shape and dtype are the ones asked for, every row matches the hash and
    every value is finite; anything else is rebuilt (under the entry's lock), never used. The
    teacher's logits (TeacherOutputs) and a diffusion teacher's (noise, endpoint) pairs
    (teachers/pairs.py) and an LM teacher's sequences (teachers/sequences.py) are such tables."""

    def __init__(self, root: str | Path, row_shape: tuple[int, ...], dtype: str = "float32",
                 reporter=None):
        self.store = Store(root, "outputs")
        self.row_shape, self.dtype, self.reporter = tuple(row_shape), dtype, reporter
        self.built: list[str] = []   # tables computed by this object (the rest were hits)

    def load(self, key: str, name: str, n: int) -> np.ndarray | None:
        """The stored table, or None (absent, or not trustworthy: rebuilt by the caller)."""
        folder = self.store.path(key)
        meta = read_json(folder / f"{name}.json")
        path = folder / f"{name}.npy"
        if meta is None or not path.exists():
            return None
        try:
            arr = np.load(path, mmap_mode="r")
            problem = _problem(arr, meta, [n, *self.row_shape], str(np.dtype(DTYPES[self.dtype])))
        except (ValueError, OSError, EOFError) as exc:   # truncated or not a .npy at all
            problem = f"unreadable ({type(exc).__name__})"
        if problem is not None:
            if self.reporter:
                self.reporter.stage(f"stored outputs {key}/{name}: {problem}; rebuilding")
            return None
        return arr

    def write(self, key: str, name: str, arr: np.ndarray) -> None:
        folder = self.store.path(key)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{name}.npy", lambda fh: np.save(fh, arr))
        # the JSON is written last: a table without it (a crash in between) is never used
        write_json(folder / f"{name}.json", {"shape": list(arr.shape), "dtype": str(arr.dtype),
                                             "checksum": _checksum(arr), "hash": HASH,
                                             "key": key})

    def get(self, key: str, name: str, n: int, compute) -> np.ndarray:
        """Table `name` of entry `key` with `n` rows; `compute()` builds it (an array of
        `[n, *row_shape]` in this store's dtype, finite) when it is absent or untrustworthy."""
        arr = self.load(key, name, n)
        if arr is None:
            with self.store.lock(f"{key}.{name}"):
                arr = self.load(key, name, n)   # another job may have built it while we waited
                if arr is None:
                    if self.reporter:
                        self.reporter.stage(f"teacher outputs: computing `{name}` once "
                                            f"(store {key})")
                    arr = compute()
                    self.write(key, name, arr)
                    self.built.append(name)
        return arr


class TeacherOutputs:
    def __init__(self, *, teacher, teacher_id: dict, data, row_shape: tuple[int, ...],
                 batch_size: int, data_seed: int, device: torch.device, autocast,
                 root: str | Path, dtype: str = "float32", reporter=None, mix=None,
                 transform=None, transform_id: dict | None = None):
        self.teacher, self.data, self.batch_size = teacher, data, batch_size
        self.row_shape = tuple(row_shape)   # one sample's stored output (the task's contract)
        # teacher logits -> stored rows (None: the logits); a transformed store keeps only the
        # training tables (the evaluation references stay dense, computed live)
        self.transform = transform
        self.serves_eval = transform is None
        self.data_seed, self.device, self.autocast = data_seed, device, autocast
        self.dtype, self.reporter = dtype, reporter
        self.mix = mix or MixSpec()
        # augmentation or mixing make every epoch's views different: one table per epoch
        self.augmented = _augmented(data.train) or self.mix.enabled
        view = ({"augment": data.identity.get("augment"), "mix": self.mix.as_dict(),
                 "data_seed": data_seed, "batch_size": batch_size}
                if self.augmented else {"plain": True})
        common = {"format": FORMAT, "teacher": teacher_id, "data": data.identity, "dtype": dtype}
        if transform_id is not None:   # absent for plain logits: their keys stay as they were
            common["signal"] = transform_id
        self.key = content_key({**common, "view": view})
        # val/test are never augmented: one entry per teacher x data, whatever the data_seed
        self.eval_key = content_key({**common, "view": "eval"})
        self.tables = TableStore(root, self.row_shape, dtype, reporter)
        self.store = self.tables.store
        self.dir = self.store.path(self.key)
        self.built: list[str] = []   # tables this run had to compute (the rest were hits)
        self.served: list[str] = []

    # ---------------------------------------------------------------- sizes for `auto`
    @staticmethod
    def projected_bytes(data, row_shape: tuple[int, ...], epochs: int, dtype: str, mix=None,
                        eval_tables: bool = True) -> int:
        n_tables = epochs if _augmented(data.train) or (mix and mix.enabled) else 1
        rows = n_tables * len(data.train) + (len(data.val) + len(data.test) if eval_tables else 0)
        return rows * int(np.prod(row_shape)) * np.dtype(DTYPES[dtype]).itemsize

    # ---------------------------------------------------------------- tables
    def _compute(self, name: str, batches, n: int) -> np.ndarray:
        out = torch.zeros(n, *self.row_shape, dtype=torch.float32)
        raw_finite = True   # before quantising: tells a NaN teacher from a float16 overflow
        with torch.inference_mode():
            for batch in batches:
                with self.autocast():
                    logits = self.teacher(batch.x).float()
                raw_finite = raw_finite and bool(torch.isfinite(logits).all())
                if self.transform is not None:
                    logits = self.transform(logits)
                out[batch.index.cpu()] = quantise(logits, self.dtype).cpu()
        arr = out.numpy().astype(DTYPES[self.dtype])
        if not bool(np.isfinite(arr).all()):   # never stored: it would poison every run
            bad = int((~np.isfinite(arr)).reshape(n, -1).any(axis=1).sum())
            why = ("Its logits overflow float16: use teacher.outputs_dtype=float32" if raw_finite
                   else "The teacher itself outputs NaN/inf (damaged or diverged weights): use "
                        "another teacher, or prune its store entry")
            raise UserError(f"The teacher's outputs for `{name}` are non-finite for {bad} of "
                            f"{n} samples", "teacher", why)
        return arr

    def table(self, key: str, name: str, batches_fn, n: int) -> torch.Tensor:
        before = len(self.tables.built)
        arr = self.tables.get(key, name, n, lambda: self._compute(name, batches_fn(), n))
        if len(self.tables.built) > before:
            self.built.append(name)
        self.served.append(name)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device)  # a copy

    def train_table(self, epoch: int) -> torch.Tensor:
        """[N_train, C] logits for the training batches of `epoch` (row = sample index)."""
        train = self.data.train
        if self.augmented:  # exactly the batches training will see in this epoch
            return self.table(self.key, f"train_e{epoch:04d}", lambda: training_batches(
                train, self.batch_size, self.data_seed, epoch, 0, self.mix,
                self.data.num_classes), len(train))
        # No augmentation: one table for every epoch, covering the samples drop_last leaves out
        # of any particular epoch too. Computed at the training batch size, because a sample's
        # logits are bit-identical across batch compositions but not across batch sizes.
        return self.table(self.key, "train", lambda: full_size_batches(train, self.batch_size), len(train))

    def eval_table(self, split: str, batch_size: int) -> torch.Tensor:
        if not self.serves_eval:
            raise RuntimeError("a transformed output store holds no evaluation tables")
        part = getattr(self.data, split)
        return self.table(self.eval_key, split, lambda: part.eval_batches(batch_size), len(part))

    def stats(self) -> dict:
        hits = sum(1 for n in self.served if n not in self.built)
        return {keys.TEACHER_OUTPUTS: "stored", keys.TEACHER_OUTPUTS_KEY: self.key,
                keys.TEACHER_OUTPUTS_HIT_RATE: hits / max(len(self.served), 1),
                keys.TEACHER_OUTPUTS_DIR: str(self.dir)}


def _augmented(split) -> bool:
    """Whether the split's training views change every epoch (token splits have no augment)."""
    augment = getattr(split, "augment", None)
    return bool(augment is not None and augment.enabled)


def full_size_batches(split, batch_size: int):
    """The split in order, in batches of exactly `batch_size` (the last one padded with the
    first samples, whose rows are simply written twice with identical values)."""
    head = None
    for batch in split.eval_batches(batch_size):
        if head is None:
            head = batch
        short = batch_size - len(batch.index)
        if short > 0 and len(head.index) >= short:
            batch = type(batch)(torch.cat([batch.index, head.index[:short]]),
                                torch.cat([batch.x, head.x[:short]]),
                                torch.cat([batch.y, head.y[:short]]))
        yield batch


@dataclass(frozen=True)
class OutputSettings:
    """What the output store reads of a run's settings."""

    mode: str            # teacher.outputs: auto | store | live
    dtype: str           # teacher.outputs_dtype: float32 | float16
    root: str            # store.root
    max_gb: float        # store.max_gb: `auto` stores only while the store stays below
    batch_size: int      # trainer.batch_size: the batches whose outputs are stored
    epochs: int          # trainer.epochs: how many per-epoch tables an augmented view needs
    data_seed: int       # data order and augmentation of those batches
    precision: str       # trainer.precision: part of the teacher's identity
    channels_last: bool  # NHWC teacher (other kernels, other last bits): its own tables


def outputs_for_run(settings: OutputSettings, objective, teacher, node: DictConfig,
                    teacher_info: dict, data, device, reporter, mix, row_shape: tuple[int, ...],
                    transform=None, transform_id: dict | None = None):
    """The run's TeacherOutputs for the teacher `node` describes, when `teacher.outputs`
    (auto|store|live), the method and the disk budget allow it; None to run the teacher live.
    `row_shape` is one sample's stored output, `transform` / `transform_id` how it is made from
    the teacher's logits and named (the task's `stored_signal`; None: the logits)."""
    mode = settings.mode
    if mode not in ("auto", "store", "live"):
        raise UserError(f"teacher.outputs={mode} is not an option", "teacher.outputs",
                        "Use auto, store or live")
    if teacher is None or mode == "live":
        return None
    reason = None
    if isinstance(objective, (StepObjective, OnlineObjective)):
        reason = f"{type(objective).__name__} needs the teacher run live (online or features)"
    elif not isinstance(data.train, HeldSplit):
        reason = "the DataLoader path's teacher views are not stored"
    need = 0
    if reason is None:
        need = TeacherOutputs.projected_bytes(data, row_shape, settings.epochs, settings.dtype,
                                              mix, eval_tables=transform is None)
    if reason is None and mode == "auto":
        used = sum(f.stat().st_size for f in Path(settings.root).expanduser().glob(
            "outputs/*/*.npy"))
        if used + need > settings.max_gb * 2**30:
            reason = (f"the store would exceed store.max_gb={settings.max_gb:g} "
                      f"({(used + need) / 2**30:.1f} GiB)")
    if reason is not None:
        if mode == "store":
            raise UserError(f"teacher.outputs=store is not possible: {reason}",
                            "teacher.outputs", "Use teacher.outputs=auto or live")
        reporter.stage(f"teacher outputs: live ({reason})")
        return None
    # the size is said before anything is computed: dense [T, V] rows of a large vocabulary
    # under teacher.outputs=store can be far more than the disk holds
    reporter.stage(f"teacher outputs: stored, {need / 2**20:,.1f} MiB at most "
                   f"(rows of {list(row_shape)} {settings.dtype})")
    if keys.TEACHER_KEY in teacher_info:
        teacher_id = {"store": teacher_info[keys.TEACHER_KEY]}
    elif keys.TEACHER_CHECKPOINT in teacher_info:
        teacher_id = checkpoint_identity(teacher_info[keys.TEACHER_CHECKPOINT])
    else:
        teacher_id = {"source": teacher_info.get(keys.TEACHER_SOURCE),
                      "model": OmegaConf.to_container(model_node(node))}
    if teacher_info.get(keys.TEACHER_BN_FOLDED):   # folded BN: other last bits, other tables
        teacher_id["bn_folded"] = True
    if teacher_info.get(keys.TEACHER_HEAD) == "ncm":   # a pool's other-task teacher (teacher_pool)
        teacher_id["head"] = "ncm"
    teacher_id["precision"] = settings.precision
    if settings.channels_last:
        # a channels_last teacher runs other kernels (other last bits): its own tables. Within
        # one format, stored == live (the input's format does not change the conv's here).
        teacher_id["memory_format"] = "channels_last"
    return TeacherOutputs(teacher=teacher, teacher_id=teacher_id, data=data, row_shape=row_shape,
                          batch_size=settings.batch_size, data_seed=settings.data_seed,
                          device=device, autocast=lambda: autocast(device, settings.precision),
                          root=settings.root, dtype=settings.dtype,
                          reporter=reporter, mix=mix, transform=transform,
                          transform_id=transform_id)


class PoolOutputs:
    """A teacher pool's stored outputs: one TeacherOutputs per member (each keyed like a single
    teacher, so a member shared with single-teacher runs shares their tables), served together
    as `[N, K, C]` tables."""

    def __init__(self, members: list[TeacherOutputs]):
        self.members = members

    def train_table(self, epoch: int) -> torch.Tensor:
        return torch.stack([m.train_table(epoch) for m in self.members], dim=1)

    def stats(self) -> dict:
        each = [m.stats() for m in self.members]
        return {keys.TEACHER_OUTPUTS: "stored",
                keys.TEACHER_OUTPUTS_KEY: [s[keys.TEACHER_OUTPUTS_KEY] for s in each],
                keys.TEACHER_OUTPUTS_HIT_RATE: sum(s[keys.TEACHER_OUTPUTS_HIT_RATE] for s in each)
                / len(each),
                keys.TEACHER_OUTPUTS_DIR: [s[keys.TEACHER_OUTPUTS_DIR] for s in each]}


def outputs_for_pool(settings: OutputSettings, pool, objective, data, device, reporter, mix,
                     row_shape) -> PoolOutputs | None:
    """`outputs_for_run` for every (entry node, teacher, info) of a multi-teacher pool; None
    (all live) unless every member can be stored."""
    members = [outputs_for_run(settings, objective, model, node, info, data, device, reporter,
                               mix, row_shape) for node, model, info in pool]
    return PoolOutputs(members) if all(m is not None for m in members) else None


def checkpoint_identity(path: str | Path) -> dict:
    """A teacher loaded from a file is identified by the file's content, not its name."""
    return {"checkpoint_sha256": sha256_file(path)}
