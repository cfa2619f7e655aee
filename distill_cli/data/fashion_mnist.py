"""Fashion-MNIST: 60k train / 10k test, 1x28x28 grayscale, 10 classes.

Looked up, in order, in: `root` itself, `root/FashionMNIST/raw` (torchvision's layout),
`root/fashion-mnist`, then Debian's `/usr/share/datasets/fashion-mnist` (package
`dataset-fashion-mnist`); if none holds the four idx files and `download` is true, torchvision
downloads them into `root/FashionMNIST/raw`. The idx files (gzipped or not) are read by the small
parser below, so the Debian layout works as is.

Default augmentation: none (allow with `augment: {crop_padding: 2, hflip: true}`).
Validation: 6000 of the 60000 training images (val_fraction 0.1, split_seed 0).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import DataBundle, make_in_memory_bundle
from distill_cli.data.sources import DEFAULT_TIMEOUT, load_torchvision, resolve_root
from distill_cli.errors import UserError

MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
SYSTEM_DIRS = [DEBIAN_DIR]
DEFAULT_AUGMENT = AugmentSpec(crop_padding=0, hflip=False)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (MNIST's format), gzipped (`.gz`) or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # last: some mirrors' naming
        p = folder / name
        if p.is_file():
            return p
    return None


def candidate_dirs(root: Path) -> list[Path]:
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", *SYSTEM_DIRS]


def find_local(root) -> Path | None:
    """The first folder (see module doc) that holds all four idx files, or None."""
    for d in candidate_dirs(resolve_root(root)):
        if d.is_dir() and all(_file(d, stem) is not None for stem in FILES.values()):
            return d
    return None


def download(root, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download with torchvision into `root/FashionMNIST/raw`; `UserError` on any failure."""
    from torchvision.datasets import FashionMNIST

    root = resolve_root(root)
    load_torchvision(FashionMNIST, "fashion_mnist", root, download=True, timeout=timeout,
                     urls=FashionMNIST.mirrors)
    return root / "FashionMNIST" / "raw"


def load_arrays(root, download_ok: bool = True, timeout: float = DEFAULT_TIMEOUT
                ) -> tuple[dict[str, np.ndarray], Path]:
    """The four arrays (uint8 images [N,28,28], uint8 labels [N]) and the folder they came from."""
    root = resolve_root(root)
    folder = find_local(root)
    if folder is None and download_ok:
        try:
            download(root, timeout=timeout)
        except UserError as e:
            raise _missing(root, f"; the download failed too ({e.what})") from e
        folder = find_local(root)
    if folder is None:
        raise _missing(root, " and dataset.download is false" if not download_ok else "")
    try:
        arrays = {k: read_idx(_file(folder, stem)) for k, stem in FILES.items()}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"Fashion-MNIST files in {folder} are unreadable ({e})", key="dataset.root",
                        fix="Delete them and run `make data`, or reinstall dataset-fashion-mnist")
    return arrays, folder


def _missing(root: Path, extra: str) -> UserError:
    where = ", ".join(str(d) for d in candidate_dirs(root))
    return UserError(
        f"Fashion-MNIST idx files not found (looked in {where}){extra}", key="dataset.root",
        fix="Install them with `apt-get install -y dataset-fashion-mnist` or `make data`, or set "
            "dataset.root to a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def build(root=None, download: bool = True, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          download_timeout: float = DEFAULT_TIMEOUT) -> DataBundle:
    aug = AugmentSpec.from_config(augment, default=DEFAULT_AUGMENT)
    arrays, _ = load_arrays(root, download_ok=bool(download), timeout=download_timeout)
    return make_in_memory_bundle(
        "fashion_mnist",
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10, mean=MEAN, std=STD, val_fraction=val_fraction, split_seed=split_seed,
        limit_train=limit_train, limit_eval=limit_eval, augment=aug, class_names=CLASSES)
