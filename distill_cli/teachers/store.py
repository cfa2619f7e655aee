"""A content-addressed on-disk store with locking and atomic publication.

Layout: `<root>/<kind>/<key>/` is a complete entry (it holds `entry.json`, written last, before
the directory is renamed into place); `<root>/<kind>/.tmp-<key>` is the entry being built;
`<root>/<kind>/<key>.lock` serialises builders. Readers never see a half-built entry: a build
that stops early leaves only its `.tmp-` directory, which the next build of the key may continue
(teachers.py) and `prune` removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from distill_cli.io import read_json, write_json

ENTRY_FILE = "entry.json"


def content_key(payload: dict) -> str:
    """A short, stable hash of a JSON-able description (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("DISTILL_HOME", "~/.cache/distill_cli")).expanduser()


class Store:
    def __init__(self, root: str | Path, kind: str):
        self.dir = Path(root).expanduser() / kind
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / key

    def get(self, key: str) -> dict | None:
        """The entry's metadata when the entry is complete, else None."""
        return read_json(self.path(key) / ENTRY_FILE)

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

    def entries(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.iterdir()):
            meta = read_json(p / ENTRY_FILE) if p.is_dir() and not p.name.startswith(".") else None
            if meta is not None:
                out.append(meta)
        return out

    def leftovers(self) -> list[Path]:
        """Directories of builds that never completed."""
        return [p for p in self.dir.iterdir()
                if p.is_dir() and (p.name.startswith(".tmp-") or not (p / ENTRY_FILE).exists())]

    def remove(self, key: str) -> None:
        with self.lock(key):
            shutil.rmtree(self.path(key), ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
