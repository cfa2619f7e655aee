"""Your own images: `root/train/<class>/*.jpg` plus a held-out `root/test/<class>/...` (or
`root/val/<class>/...`, ImageNet's layout, used when there is no `test/`).

Splits: `train/` is carved into train/val with `val_fraction`/`split_seed` like every dataset; the
held-out folder is the test split (so ImageNet's official val set is what `test` reports). Class
ids are the sorted class-folder names of `train/`; the held-out folder may only use those.

Two modes:
* streamed (default): `LoaderSplit` over a DataLoader with `num_workers` processes; training uses
  torchvision RandomResizedCrop(image_size) (`augment.random_resized_crop`) + RandomHorizontalFlip
  (`augment.hflip`), evaluation Resize(image_size/0.875) + CenterCrop(image_size). Each sample's
  random transform is seeded from (seed, epoch, step, position in batch), so batches stay a pure
  function of the training position whatever `num_workers` is.
* `in_memory: true`: every image is decoded once, Resize + CenterCrop to `image_size`, kept as
  uint8 `[N, 3, S, S]` in an `InMemorySplit`; training then uses the in-memory augmentation
  (`augment.crop_padding`, `augment.hflip`; `random_resized_crop` does not apply).

The identity holds the class names, file counts and a hash of the sorted relative file paths
(not the root, not the pixels).

Bad input is found before training: a class folder of `train/` without images is refused (it
would be a class nobody can learn), and every image the splits use is decoded up front
(`check_images`, default true; JPEGs at 1/8 scale, which still reads every byte, PNGs by their
CRCs), in threads. A corrupt image is refused with its path — or, with `skip_corrupt: true`, left
out and counted (the count and the files left out are part of the identity). An image that
breaks later anyway (changed on disk mid-run) stops the run with its path, not a traceback.
"""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from distill_cli.data.augment import AugmentSpec
from distill_cli.data.bundle import (DataBundle, InMemorySplit, LoaderSplit, common_identity,
                                     split_positions)
from distill_cli.data.sources import resolve_root
from distill_cli.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_AUGMENT = AugmentSpec(crop_padding=0, hflip=True, random_resized_crop=True)
RESIZE_RATIO = 0.875  # eval: resize the short side to image_size / 0.875, then center-crop


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and `(path, label)` samples, classes in sorted order, files sorted."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    # train/ defines the classes: an empty one there is refused; an empty held-out class folder
    # is like an absent one (that class has no test images)
    held_out = classes is not None
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in found:
        if name not in index:
            raise UserError(f"class folder {folder / name} does not exist in {folder.parent / 'train'}",
                            key="dataset.root", fix="Use the same class folders in train/ and the "
                                                    "held-out folder")
        files = []
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
        if not files and not held_out:
            raise UserError(f"class folder {folder / name} has no images (extensions "
                            f"{', '.join(IMG_EXTENSIONS)}); an empty class cannot be learnt",
                            key="dataset.root", fix="Put images in it, or remove the folder "
                                                    "(and its held-out counterpart)")
        samples += [(f, index[name]) for f in files]
    return classes, samples


def _fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _layout(root) -> tuple[Path, Path, Path]:
    fix = ("Point dataset.root at a folder with train/<class>/<images> and val/<class>/<images> "
           "(or test/<class>/<images>)")
    if root is None or str(root).strip() == "":
        raise UserError("imagefolder needs a folder of images", key="dataset.root", fix=fix)
    root = resolve_root(root)
    train_dir = root / "train"
    held = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or held is None:
        raise UserError(f"{root} has no train/ and val/ (or test/) subfolders", key="dataset.root",
                        fix=fix)
    return root, train_dir, held


def _load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... per format
        raise CorruptImage(f"image {path} cannot be decoded ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc) else \
        type(exc).__name__


class CorruptImage(UserError):
    """An image that cannot be decoded, named by path."""

    FIX = ("Remove or replace the file, or pass +dataset.skip_corrupt=true to leave corrupt "
           "images out (they are counted)")

    def __init__(self, what: str, key: str | None = "dataset.root", fix: str | None = None):
        # A DataLoader worker's exception comes back as `CorruptImage(<its traceback text>)`:
        # keep our own sentence from it, so the user still reads one paragraph.
        if "Traceback" in what:
            what = " ".join(what.rsplit("CorruptImage: ", 1)[-1].split())
            what = what.split(" Config key: ")[0]
        super().__init__(what, key, fix or self.FIX)


def _check_one(path: str) -> str | None:
    """Why `path` cannot be decoded, or None: a JPEG decoded at 1/8 scale (every byte read, the
    DCT scaled: ~1 ms), a PNG by its chunk CRCs (`verify`), anything else decoded whole."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except Exception as exc:
        return _reason(exc)
    return None


def _check_images(parts: dict[str, list[tuple[str, int]]], root: Path, skip: bool
                  ) -> tuple[set[str], list[str]]:
    """(the corrupt paths, their relative paths sorted) among the images `parts` uses; without
    `skip`, a corrupt image is a UserError naming it (the first few of them)."""
    paths = sorted({p for samples in parts.values() for p, _ in samples})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max(1, min(16, cores or 1))) as pool:   # PIL decodes without the GIL
        bad = {p: why for p, why in zip(paths, pool.map(_check_one, paths)) if why}
    if not bad:
        return set(), []
    if not skip:
        shown = "; ".join(f"{p} ({why})" for p, why in sorted(bad.items())[:3])
        raise CorruptImage(f"{len(bad)} of {len(paths)} images cannot be decoded: {shown}"
                           + (" ..." if len(bad) > 3 else ""))
    left_out = sorted(os.path.relpath(p, root) for p in bad)
    print(f"imagefolder: left out {len(bad)} corrupt image(s) of {len(paths)} "
          f"(dataset.skip_corrupt), e.g. {left_out[0]}", file=sys.stderr, flush=True)
    return set(bad), left_out


class _ImageItems(torch.utils.data.Dataset):
    """Map-style dataset over `(position, sample_seed)` keys (see `LoaderSplit`)."""

    def __init__(self, samples: list[tuple[str, int]], train_transform, eval_transform):
        self.samples = samples
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        pos, seed = key
        path, label = self.samples[pos]
        img = _load_rgb(path)
        if seed is None:
            x = self.eval_transform(img)
        elif torch.utils.data.get_worker_info() is not None:  # a worker's RNG is its own
            torch.manual_seed(seed)
            x = self.train_transform(img)
        else:  # main process: keep the caller's global RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.train_transform(img)
        return pos, x, label


def _transforms(image_size: int, aug: AugmentSpec, mean, std):
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    resize = T.Compose([T.Resize(int(round(image_size / RESIZE_RATIO))), T.CenterCrop(image_size)])
    train = [T.RandomResizedCrop(image_size) if aug.random_resized_crop else resize]
    if aug.hflip:
        train.append(T.RandomHorizontalFlip())
    return T.Compose(train + tail), T.Compose([resize] + tail), resize


def build(root=None, download: bool = False, val_fraction: float = 0.1, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, augment=None,
          image_size: int = 224, num_workers: int = 4, in_memory: bool = False,
          mean=IMAGENET_MEAN, std=IMAGENET_STD, check_images: bool = True,
          skip_corrupt: bool = False) -> DataBundle:
    """`download` is accepted for uniformity and ignored (there is nothing to download).
    `check_images`: decode every image the splits use before training (false: trust them, a
    corrupt one stops the run when it is reached); `skip_corrupt`: leave corrupt ones out."""
    aug = AugmentSpec.from_config(augment, default=DEFAULT_AUGMENT)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}",
                        key="dataset.image_size")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be an integer >= 0, got {num_workers!r}",
                        key="dataset.num_workers")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError("mean and std need 3 values (RGB), std > 0", key="dataset.mean")
    root, train_dir, held_dir = _layout(root)
    classes, train_samples = _scan(train_dir, None)
    _, test_samples = _scan(held_dir, classes)
    if not classes or not train_samples or not test_samples:
        empty = train_dir if not train_samples else held_dir
        raise UserError(f"no images found in {empty} (expected <class>/<image> files with "
                        f"extensions {', '.join(IMG_EXTENSIONS)})", key="dataset.root",
                        fix="Point dataset.root at a folder with train/ and val/ (or test/) "
                            "class subfolders holding images")
    tr, va, te = split_positions(len(train_samples), len(test_samples), val_fraction=val_fraction,
                                 split_seed=split_seed, limit_train=limit_train,
                                 limit_eval=limit_eval)
    pick = lambda samples, pos: [samples[i] for i in pos.tolist()]  # noqa: E731
    parts = {"train": pick(train_samples, tr), "val": pick(train_samples, va),
             "test": pick(test_samples, te)}
    # the split is a function of the file list, not of which files are damaged: checked after
    left_out: list[str] = []
    if check_images or skip_corrupt:
        bad, left_out = _check_images(parts, root, bool(skip_corrupt))
        tr_all = tr
        if bad:
            keep = {k: [p not in bad for p, _ in v] for k, v in parts.items()}
            parts = {k: [x for x, ok in zip(v, keep[k]) if ok] for k, v in parts.items()}
            tr, va, te = (pos[torch.tensor(keep[k], dtype=torch.bool)] if len(pos) else pos
                          for k, pos in (("train", tr), ("val", va), ("test", te)))
            gone = sorted({y for _, y in pick(train_samples, tr_all)} - {y for _, y in
                                                                         parts["train"]})
            if gone or not parts["test"]:
                what = (f"every training image of class {classes[gone[0]]} is corrupt" if gone
                        else "every image of the test split is corrupt")
                raise UserError(what, key="dataset.root", fix="Replace the corrupt images")
    train_tf, eval_tf, resize = _transforms(image_size, aug, mean, std)

    if in_memory:
        from torchvision.transforms.functional import pil_to_tensor

        def decode(samples):
            if not samples:
                return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
            return torch.stack([pil_to_tensor(resize(_load_rgb(p))) for p, _ in samples])

        splits = {name: InMemorySplit(decode(s), torch.tensor([y for _, y in s], dtype=torch.int64),
                                      mean=mean, std=std, augment=aug if name == "train" else None,
                                      source_index=pos)
                  for (name, s), pos in zip(parts.items(), (tr, va, te))}
    else:
        splits = {name: LoaderSplit(_ImageItems(s, train_tf if name == "train" else eval_tf, eval_tf),
                                    torch.tensor([y for _, y in s], dtype=torch.int64),
                                    num_workers=num_workers, augment=name == "train")
                  for name, s in parts.items()}
    identity = common_identity(
        "imagefolder", val_fraction=val_fraction, split_seed=split_seed, limit_train=limit_train,
        limit_eval=limit_eval, augment=aug, num_classes=len(classes),
        input_shape=[3, image_size, image_size], image_size=image_size, in_memory=bool(in_memory),
        heldout_folder=held_dir.name, classes=list(classes),
        files={"train": len(train_samples), "test": len(test_samples)},
        # which files were left out changes the data: a count + hash (a list could be long)
        **({"left_out_corrupt": {"count": len(left_out), "sha256": hashlib.sha256(
            "\n".join(left_out).encode()).hexdigest()[:16]}} if left_out else {}),
        files_sha256=_fingerprint(root, train_samples + test_samples),
        sizes={k: len(v) for k, v in splits.items()},
        normalization={"mean": list(mean), "std": list(std)})
    return DataBundle(name="imagefolder", train=splits["train"], val=splits["val"],
                      test=splits["test"], num_classes=len(classes),
                      input_shape=(3, image_size, image_size), identity=identity,
                      class_names=tuple(classes))
