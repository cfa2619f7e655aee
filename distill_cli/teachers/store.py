"""A content-addressed on-disk store with locking and atomic publication.

Layout: `<root>/<kind>/<key>/` is a complete entry (it holds `entry.json`, written last, before
the directory is renamed into place); `<root>/<kind>/.tmp-<key>` is the entry being built;
`<root>/<kind>/<key>.lock` serialises builders. Readers never see a half-built entry: a build
that stops early leaves only its `.tmp-` directory, which the next build of the key may continue
(teachers.py) and `prune` removes.

An entry whose `entry.json` is not what `publish` wrote (emptied, hand-edited, `{}`) is BROKEN:
never used as a teacher, listed as broken, removed by `distill-teachers prune <key>`. Listing
and pruning never create the store's directories.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from distill_cli.errors import UserError
from distill_cli.io import blocking_file, read_json, write_json

ENTRY_FILE = "entry.json"


def content_key(payload: dict) -> str:
    """A short, stable hash of a JSON-able description (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("DISTILL_HOME", "~/.cache/distill_cli")).expanduser()


def prune_command(root: str | Path, key: str) -> str:
    """The command that removes entry `key` (`--root` named unless it is the default)."""
    named = Path(root).expanduser() != default_root()
    return "distill-teachers " + (f"--root {root} " if named else "") + f"prune {key}"


def teacher_entry_problem(meta) -> str | None:
    """Why a teacher entry's metadata is not what `publish` wrote, or None (every field a
    reader indexes: the run's reuse line, `distill-teachers list`)."""
    if not isinstance(meta, dict):
        return f"entry.json holds a {type(meta).__name__}, not the entry's metadata"
    kinds = {"key": str, "arch": str, "dataset": str, "created": str, "size_bytes": int,
             "description": dict}
    # the test record: `test_score` (any task's selection metric) or, before it, `test_acc1`
    kinds["test_score" if "test_score" in meta else "test_acc1"] = (int, float)
    bad = [k for k, kind in kinds.items()
           if not isinstance(meta.get(k), kind) or isinstance(meta.get(k), bool)]
    if bad:
        return f"entry.json lacks or mangles {', '.join(bad)}"
    for k in ("test_score", "test_acc1"):
        if k in meta and not (isinstance(meta[k], (int, float)) and math.isfinite(meta[k])):
            return f"entry.json records {k}={meta[k]}"
    return None


ENTRY_CHECKS = {"teachers": teacher_entry_problem}


class BrokenEntry(UserError):
    """A complete-looking entry (`<key>/entry.json` exists) whose metadata is unusable."""

    def __init__(self, path: Path, reason: str, root: str | Path, key: str):
        self.path, self.reason = path, reason
        super().__init__(f"The store entry {path} is broken ({reason})", "store.root",
                         f"Remove it with `{prune_command(root, key)}`; the next run that "
                         "needs it builds it again")


class Store:
    def __init__(self, root: str | Path, kind: str, *, create: bool = True,
                 root_key: str = "store.root"):
        """`create=False` (list, prune): a store that does not exist reads as empty and is not
        created. `root_key` names the setting that gave `root` in errors."""
        self.root, self.kind = root, kind
        self.dir = Path(root).expanduser() / kind
        self.check = ENTRY_CHECKS.get(kind, lambda meta: None if isinstance(meta, dict)
                                      else f"entry.json holds a {type(meta).__name__}")
        fix = "Point it at a directory (or a path where one can be created)"
        if (p := blocking_file(self.dir / "entry")) is not None:
            raise UserError(f"The store root {root} is not a directory ({p} is a file)",
                            root_key, fix)
        if create:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:   # a file on the way, no permission, read-only mount
                raise UserError(f"Cannot create the store directory {self.dir} "
                                f"({type(exc).__name__}: {exc.strerror or exc})", root_key,
                                fix) from None

    def path(self, key: str) -> Path:
        return self.dir / key

    def _problem(self, key: str) -> tuple[dict | None, str | None]:
        """(metadata, None) for a good entry, (None, None) for none, (None, why) if broken."""
        file = self.path(key) / ENTRY_FILE
        if not file.is_file():
            return None, None
        meta = read_json(file)
        if meta is None:
            return None, "entry.json is empty or not JSON"
        problem = self.check(meta)
        if problem is None and meta.get("key", key) != key:
            problem = f"entry.json names key {meta.get('key')!r}"
        return (None, problem) if problem else (meta, None)

    def get(self, key: str) -> dict | None:
        """The entry's metadata when the entry is complete, None when there is none; a broken
        entry raises `BrokenEntry` (naming the command that removes it)."""
        meta, problem = self._problem(key)
        if problem:
            raise BrokenEntry(self.path(key) / ENTRY_FILE, problem, self.root, key)
        return meta

    @contextmanager
    def lock(self, key: str, on_wait=None) -> Iterator[None]:
        """Hold the key's lock; `on_wait()` is called once if another process holds it."""
        # flock-based: released by the kernel if the holder dies, so a crash never deadlocks
        lock = FileLock(str(self.dir / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def staging(self, key: str) -> Path:
        """The build directory of `key`, kept when a build stops early so that the next build
        can continue it. Call with the key's lock held: no other build of the key is alive."""
        # earlier versions left one dir per attempt: dead builds, as the lock is ours
        for dead in self.dir.glob(f".tmp-{key}-*"):
            shutil.rmtree(dead, ignore_errors=True)
        path = self.dir / f".tmp-{key}"
        path.mkdir(exist_ok=True)
        path.chmod(0o755)
        return path

    def publish(self, key: str, staging: Path, meta: dict) -> dict:
        """Make `staging` the entry `key`. Call with the key's lock held."""
        meta = {**meta, "key": key, "size_bytes": _size(staging)}
        write_json(staging / ENTRY_FILE, meta)
        final = self.path(key)
        if final.exists():  # an incomplete leftover without entry.json
            shutil.rmtree(final)
        os.replace(staging, final)
        return meta

    def _entry_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / ENTRY_FILE).exists())

    def entries(self) -> list[dict]:
        """The metadata of every good entry (broken ones are in `broken()`)."""
        return [meta for meta, _ in map(self._problem, (p.name for p in self._entry_dirs()))
                if meta is not None]

    def broken(self) -> dict[str, str]:
        """{key: why} of the entries whose metadata is unusable."""
        out = {}
        for p in self._entry_dirs():
            problem = self._problem(p.name)[1]
            if problem:
                out[p.name] = problem
        return out

    def leftovers(self) -> list[Path]:
        """Directories of builds that never completed."""
        if not self.dir.is_dir():
            return []
        return [p for p in self.dir.iterdir()
                if p.is_dir() and (p.name.startswith(".tmp-") or not (p / ENTRY_FILE).exists())]

    def remove(self, key: str) -> None:
        with self.lock(key):
            shutil.rmtree(self.path(key), ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
