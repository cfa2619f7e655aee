"""Getting data onto disk: root resolution, bounded torchvision downloads, and `make data`.

`python -m distill_cli.data.fetch fashion_mnist [--root DIR] [--timeout S]` (what `make data` runs):
succeeds at once when Fashion-MNIST is already available (under the root, or Debian's
/usr/share/datasets/fashion-mnist); else tries a torchvision download into the root; else, when
running as root, `apt-get install -y dataset-fashion-mnist` (with `apt-get update` first if the
plain install fails); else prints what to do and exits 2. `mnist`, `cifar10`, `cifar100` and `svhn`
are fetched with torchvision; `digits`, `mnist1d` and `fake` need nothing.

Downloads never hang: the download host is probed first with a bounded connect (DNS included, in
a daemon thread), and the transfer runs under a socket timeout; every failure becomes a
`UserError`. Concurrent runs of a sweep serialise their downloads with a file lock in the root.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from distill_cli.errors import UserError

DEFAULT_ROOT = "data"
ENV_ROOT = "DISTILL_DATA"
DEFAULT_TIMEOUT = 20.0
NEEDS_NOTHING = ("digits", "mnist1d", "fake")
TORCHVISION_SOURCES = ("mnist", "cifar10", "cifar100", "svhn")


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


# --- command line ---------------------------------------------------------------------------

def _apt_install_fashion_mnist() -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    print("fetch: trying `apt-get install -y dataset-fashion-mnist`", flush=True)
    try:
        if subprocess.run(cmd, env=env, timeout=1800).returncode == 0:
            return True
        print("fetch: install failed; running `apt-get update` and retrying", flush=True)
        subprocess.run(["apt-get", "update"], env=env, timeout=1800)
        return subprocess.run(cmd, env=env, timeout=1800).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"fetch: apt-get failed: {e}", flush=True)
        return False


def fetch_fashion_mnist(root: Path, timeout: float) -> int:
    from distill_cli.data import fashion_mnist as fm

    found = fm.find_local(root)
    if found is not None:
        print(f"fetch: Fashion-MNIST found in {found}")
        return 0
    try:
        fm.download(root, timeout=timeout)
        found = fm.find_local(root)
        if found is not None:
            print(f"fetch: Fashion-MNIST downloaded into {found}")
            return 0
    except UserError as e:
        print(f"fetch: {e.what}", flush=True)
    if _apt_install_fashion_mnist():
        found = fm.find_local(root)
        if found is not None:
            print(f"fetch: Fashion-MNIST installed in {found}")
            return 0
    print(
        "fetch: Fashion-MNIST is not available and could not be fetched. Do one of:\n"
        "  sudo apt-get install -y dataset-fashion-mnist   (Debian/Ubuntu; files land in "
        f"{fm.DEBIAN_DIR})\n"
        f"  copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,\n"
        f"  t10k-labels-idx1-ubyte.gz into {root} (or set DISTILL_DATA / dataset.root to their folder)\n"
        "  rerun `make data` where the internet is reachable", file=sys.stderr)
    return 2


def fetch(name: str, root=None, timeout: float = DEFAULT_TIMEOUT) -> int:
    root = resolve_root(root)
    if name == "fashion_mnist":
        return fetch_fashion_mnist(root, timeout)
    if name in NEEDS_NOTHING:
        print(f"fetch: {name} is generated or shipped locally; nothing to fetch")
        return 0
    if name in TORCHVISION_SOURCES:
        import importlib

        module = importlib.import_module(
            f"distill_cli.data.{'cifar' if name.startswith('cifar') else name}")
        try:
            getattr(module, f"ensure_{name}" if name.startswith("cifar") else "ensure")(
                root, download=True, timeout=timeout)
        except UserError as e:
            print(f"fetch: {e}", file=sys.stderr)
            return 2
        print(f"fetch: {name} available under {root}")
        return 0
    if name == "imagefolder":
        print("fetch: imagefolder reads your own folder (dataset.root); nothing to fetch",
              file=sys.stderr)
        return 2
    print(f"fetch: unknown dataset {name!r}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_cli.data.fetch",
                                     description="Make a dataset available on disk.")
    parser.add_argument("name", choices=("fashion_mnist",) + TORCHVISION_SOURCES + NEEDS_NOTHING)
    parser.add_argument("--root", default=None,
                        help=f"data folder (default: ${ENV_ROOT}, else ./{DEFAULT_ROOT})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="network timeout in seconds (default %(default)s)")
    args = parser.parse_args(argv)
    return fetch(args.name, args.root, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
