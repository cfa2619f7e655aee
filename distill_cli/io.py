"""Files every floor writes and reads: atomic writes and JSON (summaries, store entries).

An atomic write goes through a temp file named after its writer,
`.<name>~<machine>~<pid>~<random>.tmp`, so a writer killed mid-write (SIGKILL, power loss)
leaves a temp file that `remove_stale_tmp` can tell apart from one a live process is writing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def _machine() -> str:
    """Where a pid means something: the host name and, on Linux, the pid namespace (two
    containers may share a host name and a volume but not their pids)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    try:
        return f"{host}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


_MACHINE = _machine()
_TMP = re.compile(r"^\.(?P<name>.+)~(?P<machine>[^~]+)~(?P<pid>\d+)~[^~]*\.tmp$")


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temp file in the same dir, fsync, then `os.replace`: readers never see a
    partial file and a crash leaves the previous version intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}~{_MACHINE}~{os.getpid()}~", suffix=".tmp",
                               dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: dict) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(data))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete the temp files in `directory` that `atomic_write_bytes` writers left when they
    died mid-write; returns them. Only a temp file of THIS machine whose writer's pid no longer
    runs is stale: another machine's (a shared filesystem) or a live process's is left alone,
    and so is a recycled pid's (kept, never wrongly deleted). Temp files named the older way
    (`.<name>.<random>.tmp`, no writer recorded) are left alone too."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:   # absent or unreadable: nothing to clean
        return removed
    for name in names:
        m = _TMP.match(name)
        if m is None or m["machine"] != _MACHINE or _alive(int(m["pid"])):
            continue
        try:
            (Path(directory) / name).unlink()
            removed.append(Path(directory) / name)
        except FileNotFoundError:   # another cleaner was first
            pass
    return removed


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def blocking_file(path: str | Path) -> Path | None:
    """The existing non-directory on the way to `path` (which therefore cannot be created
    as a directory or written into), or None when the path is creatable."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
