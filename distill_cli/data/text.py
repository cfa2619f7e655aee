"""Text corpora for language models (`dataset=text`): documents -> split -> token blocks.

Corpora (`dataset.corpus`), each a list of documents in a fixed order:

* `stdlib` (default): this Python's standard-library `.py` sources, one document per file, in
  sorted path order. It exists wherever Python runs, with no network or package to install.
  Left out: tests (`test/`, `tests/`, `idle_test/`), bundled or generated material that is not
  ordinary code (`site-packages`, `dist-packages`, `ensurepip` wheels, `pydoc_data` (one
  generated string blob), `encodings` (generated codec tables)), and the apps `idlelib`,
  `turtledemo`, `lib2to3` (deprecated; it carries its own test data).
* `bible`: the King James Bible from Debian's `bible-kjv` (its data is compressed; the `bible`
  program prints it), one document per CHAPTER (1189; 66 books are too few to split three ways),
  one verse per line.
* `fortunes`: Debian's `fortunes` files (`%`-separated), one document per fortune.
* `path`: `dataset.path`, a folder (every `.txt` / `.md` below it, one document per file, sorted
  by relative path) or one file (one document per paragraph: blank lines separate them).

Documents that are empty or only whitespace are dropped. The split is BY DOCUMENT: a
`split_seed` permutation of the documents gives test = the first round(n*test_fraction), val =
the next round(n*val_fraction), train = the rest (each kept in corpus order). A split's documents
are joined as `doc <eod> doc <eod> ...` and cut into blocks of block_size + 1 tokens at stride
block_size (consecutive blocks share one token), so every token of the stream is a target exactly
once: x = block[:-1], y = block[1:]. The split's last block is padded: x with `<pad>`, y with -100.

The tokenizer (data/tokenizer.py) is named by its key in `identity["tokenizer"]`; get it back
with `distill_cli.data.tokenizer.load(key, store_root)`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from distill_cli.data.bundle import (DATA_VERSION, Batch, DataBundle, HeldSplit,
                                     _check_batch_size, check_common)
from distill_cli.errors import UserError

#: bump when a change here alters the documents, split or blocks a config yields
TEXT_VERSION = 1
CORPORA = ("stdlib", "bible", "fortunes", "path")
IGNORE = -100
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                         "ensurepip", "pydoc_data", "encodings", "idlelib", "turtledemo",
                         "lib2to3", "__pycache__"})
FORTUNES_DIR = Path("/usr/share/games/fortunes")
BIBLE_DATA = Path("/usr/lib/bible.data")


# --- corpora ----------------------------------------------------------------------------------

def _missing(corpus: str, what: str, package: str) -> UserError:
    return UserError(f"The {corpus} corpus is not on this machine ({what})", "dataset.corpus",
                     f"Install it with `apt-get install -y {package}`, or use "
                     "dataset.corpus=stdlib (always present)")


def _stdlib() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-"))
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return [p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(files, key=lambda p: p.relative_to(root).as_posix())]


def _bible() -> list[str]:
    exe = shutil.which("bible")
    if exe is None or not BIBLE_DATA.is_file():
        raise _missing("bible", "no `bible` program or /usr/lib/bible.data", "bible-kjv")
    # -f off: one verse per line as "Book<chapter>:<verse> text"; the range is the whole book
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, check=False, timeout=120)
    chapters: dict[str, list[str]] = {}
    for line in out.stdout.decode("utf-8", errors="replace").splitlines():
        m = re.match(r"^(\d?[A-Za-z]+\d+):\d+ (.*)$", line)
        if m:
            chapters.setdefault(m.group(1), []).append(m.group(2))
    if out.returncode != 0 or len(chapters) < 1000:
        raise _missing("bible", f"`bible` exited {out.returncode} with {len(chapters)} chapters",
                       "bible-kjv")
    return ["\n".join(verses) + "\n" for verses in chapters.values()]   # insertion = Bible order


def _fortunes() -> list[str]:
    files = sorted(p for p in FORTUNES_DIR.glob("*")
                   if p.is_file() and not p.is_symlink() and not p.suffix) \
        if FORTUNES_DIR.is_dir() else []
    if not files:
        raise _missing("fortunes", f"no fortune files in {FORTUNES_DIR}", "fortunes")
    docs = []
    for f in files:
        docs += re.split(r"^%\n", f.read_text(encoding="utf-8", errors="replace"), flags=re.M)
    return docs


def _read_user(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:   # silently replacing bytes would corrupt the data
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "dataset.path", f"Convert it, e.g. `iconv -f latin1 -t utf-8 {path}`, "
                        "or move it out of the folder") from None
    except OSError as exc:
        raise UserError(f"Cannot read {path} ({exc.strerror or exc})", "dataset.path") from None


def _user(path) -> list[str]:
    if path is None or str(path).strip() == "":
        raise UserError("dataset.corpus=path needs dataset.path", "dataset.path",
                        "Set dataset.path=<a .txt/.md file or a folder of them>")
    p = Path(str(path)).expanduser()
    if p.is_file():
        return re.split(r"\n[ \t]*\n", _read_user(p))
    if not p.is_dir():
        raise UserError(f"dataset.path {p} does not exist", "dataset.path",
                        "Point it at a .txt/.md file or a folder of them")
    files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".md")),
                   key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise UserError(f"dataset.path {p} holds no .txt or .md file", "dataset.path",
                        "Point it at a folder of .txt/.md files (searched recursively)")
    return [_read_user(f) for f in files]


def read_corpus(corpus: str, path=None) -> list[str]:
    """The non-empty documents of `corpus`, in its fixed order."""
    readers = {"stdlib": _stdlib, "bible": _bible, "fortunes": _fortunes,
               "path": lambda: _user(path)}
    if corpus not in readers:
        raise UserError(f"unknown corpus {corpus!r}", "dataset.corpus",
                        f"Use one of {', '.join(CORPORA)}")
    docs = [d for d in readers[corpus]() if d.strip()]
    if corpus == "path" and len(docs) < 3:
        raise UserError(f"dataset.path {path} gives {len(docs)} non-empty document(s); the "
                        "split by document needs at least 3 (train, val, test)", "dataset.path",
                        "Give a folder of several files, or a file of several paragraphs")
    return docs


def content_hash(documents: Sequence[str]) -> str:
    """SHA-256 of the documents in order (each length-prefixed: boundaries count)."""
    h = hashlib.sha256()
    for d in documents:
        b = d.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# --- split and blocks -------------------------------------------------------------------------

def split_documents(n: int, *, val_fraction: float, test_fraction: float, split_seed: int
                    ) -> tuple[list[int], list[int], list[int]]:
    """Document indices (ascending) of train, val, test."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}",
                        "dataset.test_fraction", "Use e.g. 0.1")
    n_test = max(1, int(round(n * float(test_fraction))))
    n_val = int(round(n * float(val_fraction)))
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_test + n_val >= n or float(val_fraction) + float(test_fraction) >= 1.0:
        raise UserError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave "
                        f"no training document out of {n}", "dataset.test_fraction",
                        "Lower the fractions or use a larger corpus")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return sorted(train), sorted(val), sorted(test)


def split_identity(val_fraction, test_fraction, split_seed) -> dict:
    """What determines the split of a given corpus (part of the identity and of BPE keys)."""
    return {"text_version": TEXT_VERSION, "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction), "split_seed": int(split_seed)}


def token_stream(doc_ids: Sequence[np.ndarray], eod_id: int) -> np.ndarray:
    """`doc <eod> doc <eod> ...` as one int64 array."""
    parts = []
    for ids in doc_ids:
        parts += [np.asarray(ids, dtype=np.int64), np.array([eod_id], dtype=np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def cut_blocks(stream: np.ndarray, block_size: int, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y int64 [N, T]: windows of T + 1 tokens at stride T, the last one padded."""
    t = block_size
    n = max(0, -(-(len(stream) - 1) // t))   # ceil((L-1)/T): blocks until every token is a y
    padded = np.full(n * t + 1, pad_id, dtype=np.int64)
    padded[:len(stream)] = stream
    valid = np.zeros(n * t + 1, dtype=bool)
    valid[:len(stream)] = True
    idx = np.arange(n)[:, None] * t + np.arange(t + 1)[None, :]
    blocks, ok = padded[idx], valid[idx]
    y = np.where(ok[:, 1:], blocks[:, 1:], IGNORE)
    return torch.from_numpy(np.ascontiguousarray(blocks[:, :-1])), torch.from_numpy(y)


class TokenSplit(HeldSplit):
    """A split of token blocks held in memory: x, y int64 [N, T] (y = -100 where not counted).

    Same contract and determinism as `InMemorySplit`: epoch `e` is ordered by
    `epoch_order(N, seed, e)`, batch `step` takes positions order[step*B:(step+1)*B] (drop_last),
    so batches are a pure function of (seed, epoch, step) and `start_step` resumes. There is no
    augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.dim() != 2 or x.shape != y.shape:
            raise ValueError(f"x and y must be [N, T] alike, got {tuple(x.shape)}, {tuple(y.shape)}")
        self.x = x.to(torch.int64)
        self.y = y.to(device=x.device, dtype=torch.int64)

    def _train_iter(self, order, batch_size, seed, epoch, start_step, steps) -> Iterator[Batch]:
        for step in range(start_step, steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            yield Batch(idx, self.x.index_select(0, idx), self.y.index_select(0, idx))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_batch_size(batch_size)
        return self._eval_iter(batch_size)

    def _eval_iter(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield Batch(torch.arange(start, stop, device=self.device), self.x[start:stop],
                        self.y[start:stop])

    def to(self, device) -> "TokenSplit":
        device = torch.device(device)
        return self if device == self.device else TokenSplit(self.x.to(device), self.y.to(device))

    def __repr__(self) -> str:
        return f"TokenSplit(n={len(self)}, block={self.x.shape[1]}, device={self.device})"


def _limit(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> TokenSplit:
    """A fixed random `limit` of the blocks (seeded by split_seed), kept in stream order."""
    if limit is not None and limit < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        keep = keep.sort().values
        x, y = x.index_select(0, keep), y.index_select(0, keep)
    return TokenSplit(x.contiguous(), y.contiguous())


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key.split('.')[-1]} must be a positive integer, got {value!r}", key)
    return value


def build(corpus: str = "stdlib", path=None, tokenizer: str = "byte", vocab_size=4096,
          block_size: int = 256, val_fraction: float = 0.1, test_fraction: float = 0.1,
          split_seed: int = 0, limit_train: int | None = None, limit_eval: int | None = None,
          store_root="~/.cache/distill_cli", root=None, download: bool = False,
          augment=None) -> DataBundle:
    """The `dataset=text` bundle (`root` / `download` are accepted like every dataset, unused;
    token blocks have no augmentation)."""
    if augment:
        raise UserError("Token blocks have no augmentation", "dataset.augment",
                        "Drop dataset.augment (null) for dataset=text")
    check_common(val_fraction, split_seed, limit_train, limit_eval)
    block_size = _positive_int(block_size, "dataset.block_size")
    docs = read_corpus(corpus, path)
    train, val, test = split_documents(len(docs), val_fraction=val_fraction,
                                       test_fraction=test_fraction, split_seed=split_seed)
    corpus_hash = content_hash(docs)
    split = split_identity(val_fraction, test_fraction, split_seed)
    from distill_cli.data import tokenizer as tokenizers

    tok, ids = tokenizers.prepare(
        tokenizer, documents=docs, train=train, corpus_hash=corpus_hash, split=split,
        vocab_size=vocab_size, root=store_root,
        on_build=lambda key: print(f"training tokenizer {key} (bpe, vocab {vocab_size}) on "
                                   f"{len(train)} documents", flush=True))
    splits = {}
    for name, members, limit in (("train", train, limit_train), ("val", val, limit_eval),
                                 ("test", test, limit_eval)):
        x, y = cut_blocks(token_stream([ids[i] for i in members], tok.eod_id), block_size,
                          tok.pad_id)
        splits[name] = _limit(x, y, limit, split_seed)
    identity = {
        "name": "text", "data_version": DATA_VERSION, **split, "corpus": corpus,
        "corpus_hash": corpus_hash, "documents": len(docs), "tokenizer": tok.key,
        "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size, "block_size": block_size,
        "limit_train": limit_train, "limit_eval": limit_eval, "num_classes": tok.vocab_size,
        "input_shape": [block_size], "augment": None,
        "sizes": {k: len(s) for k, s in splits.items()},
        "split_documents": {"train": len(train), "val": len(val), "test": len(test)}}
    # (1, T): one channel of T token ids, the zoo's convention for sequences (MNIST-1D's (1, L)),
    # so every model builder passes in_channels=1, input_size=(T,)
    return DataBundle(name="text", num_classes=tok.vocab_size, input_shape=(1, block_size),
                      identity=identity, **splits)
