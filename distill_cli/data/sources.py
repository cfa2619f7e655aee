"""Getting files onto disk for the dataset builders: root resolution and bounded torchvision
downloads (`make data` is `fetch.py`, which builds on this).

Downloads never hang: the download host is probed first with a bounded connect (DNS included, in
a daemon thread), and the transfer runs under a socket timeout; every failure becomes a
`UserError`. Concurrent runs of a sweep serialise their downloads with a file lock in the root.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from distill_cli.errors import UserError

DEFAULT_ROOT = "data"
ENV_ROOT = "DISTILL_DATA"
DEFAULT_TIMEOUT = 20.0


def resolve_root(root: str | os.PathLike | None) -> Path:
    """`root` as an absolute path; None/"" means `$DISTILL_DATA`, else `./data` (of the cwd)."""
    if root is None or str(root).strip() == "":
        root = os.environ.get(ENV_ROOT) or DEFAULT_ROOT
    return Path(os.path.expandvars(os.path.expanduser(str(root)))).absolute()


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` s, else the reason."""
    result: list[str | None] = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=attempt, daemon=True, name=f"probe-{host}")
    t.start()
    t.join(timeout)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def check_reachable(urls: Iterable[str], timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """None if any URL's host accepts a connection within `timeout` s; else why none did."""
    reasons = []
    for url in urls:
        u = urlparse(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        why = _probe(u.hostname or "", port, timeout)
        if why is None:
            return None
        reasons.append(f"{u.hostname}: {why}")
    return "; ".join(reasons) or "no download URL"


@contextlib.contextmanager
def socket_timeout(timeout: float):
    """Bound every blocking socket operation (urllib inside torchvision) for the duration."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def download_lock(root: Path, name: str):
    """Serialise downloads of `name` into `root` across processes (a sweep's parallel runs)."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.download.lock")):
        yield


def _not_found(name: str, root: Path, extra: str = "") -> UserError:
    return UserError(
        f"{name} not found under {root}{extra}", key="dataset.root",
        fix=f"Set dataset.download=true, run `python -m distill_cli.data.fetch {name} --root {root}`, "
            f"or point dataset.root at a folder that holds it")


def load_torchvision(cls, name: str, root, *, download: bool, urls: Iterable[str],
                     timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """`cls(root, download=..., **kwargs)` with every failure turned into a quick `UserError`.

    Tries the files on disk first; downloads only when allowed, after a bounded reachability
    probe, under a socket timeout and a cross-process lock.
    """
    root = resolve_root(root)
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError as e:  # "Dataset not found or corrupted"
        missing = str(e)
    if not download:
        raise _not_found(name, root, f" ({missing.split('.')[0]}) and dataset.download is false")
    timeout = float(timeout)
    with download_lock(root, name):
        with contextlib.suppress(RuntimeError):  # another process may have fetched it meanwhile
            return cls(str(root), download=False, **kwargs)
        urls = list(urls)
        why = check_reachable(urls, timeout)
        if why is not None:
            raise UserError(
                f"could not download {name}: the download server is unreachable ({why})",
                key="dataset.root",
                fix=f"Connect to the internet, or copy the {name} files under {root} (or point "
                    f"dataset.root at a folder that holds them) and set dataset.download=false")
        try:
            with socket_timeout(timeout):
                return cls(str(root), download=True, **kwargs)
        except Exception as e:  # network errors, timeouts, bad checksums
            raise UserError(f"could not download {name} into {root}: {type(e).__name__}: {e}",
                            key="dataset.root",
                            fix=f"Retry, or copy the {name} files under {root} by hand") from e
