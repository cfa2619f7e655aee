"""Tokenizers of language-model text: `byte` (UTF-8 bytes) and `bpe` (ByteLevel BPE, trained once).

Both reserve two special ids, `<eod>` (ends every document of the token stream) and `<pad>` (fills
the tail of a split's last block, whose targets are -100). Special tokens are never matched
inside text: a document that literally contains "<eod>" is encoded as its characters.

* `byte`: ids 0..255 are the UTF-8 bytes, `<eod>` = 256, `<pad>` = 257 (vocab 258). Nothing is
  trained or stored; encoding is a buffer view, so it needs no cache.
* `bpe`: a `tokenizers` ByteLevel BPE of `vocab_size` ids (`<eod>` = 0, `<pad>` = 1, then the 256
  byte symbols, then merges) trained on the TRAINING documents only (nothing of val/test leaks
  into the merges). Stored like a teacher: `<store.root>/tokenizers/<key>/` holds
  `tokenizer.json`, the whole corpus encoded once (`ids.npy` uint16 or int32, `offsets.npy`
  int64 [documents + 1]) and `meta.json` (written last, with the files' SHA-256). key = 16 hex of
  SHA-256 over (corpus content hash, split, vocab size, tokenizers version, special tokens,
  FORMAT). One build per key: a file lock on `<key>.lock`, built in `.tmp-<key>` and renamed into
  place, the pattern of teachers/store.py. An entry whose files do not match meta.json is refused
  with a UserError (never silently retrained over). Training is deterministic: the same inputs
  give the same tokenizer.json bytes and ids.

This module imports only the ground floor (errors, io), numpy, filelock and, lazily, `tokenizers`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill_cli.errors import UserError
from distill_cli.io import atomic_write_bytes, read_json, sha256_file, write_json

SPECIALS = ("<eod>", "<pad>")
KINDS = ("byte", "bpe")
#: bump when the entry layout or the training recipe changes (part of every key)
FORMAT = 1
STORE_KIND = "tokenizers"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("dataset.tokenizer=bpe needs the `tokenizers` package, which is not "
                        "installed", "dataset.tokenizer",
                        "Install the language-model extra with `pip install -e .[lm]`, or use "
                        "dataset.tokenizer=byte") from None
    return tokenizers


class ByteTokenizer:
    kind = "byte"
    key = "byte"
    vocab_size = 258
    eod_id, pad_id = 256, 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        """Bytes decoded as UTF-8 (an invalid sequence, e.g. a block cut mid-character, shows as
        U+FFFD); special ids as their names."""
        out, run = [], bytearray()
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(SPECIALS[i - 256] if i in (256, 257) else "\ufffd")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab=258)"


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok, key: str):
        tok.encode_special_tokens = True   # "<eod>" in a document is text, not the separator
        self._tok, self.key = tok, key
        self.vocab_size = int(tok.get_vocab_size())
        self.eod_id, self.pad_id = (int(tok.token_to_id(s)) for s in SPECIALS)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(),
                                skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer(key={self.key}, vocab={self.vocab_size})"


def bpe_key(corpus_hash: str, split: dict, vocab_size: int) -> str:
    payload = {"kind": "bpe", "corpus": corpus_hash, "split": split, "vocab_size": int(vocab_size),
               "tokenizers": _tokenizers().__version__, "specials": list(SPECIALS),
               "format": FORMAT}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_vocab_size(vocab_size) -> int:
    lo = 256 + len(SPECIALS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not lo <= vocab_size <= 1 << 24:
        raise UserError(f"vocab_size must be an integer in [{lo}, 2^24] for tokenizer=bpe (the "
                        f"256 byte symbols + {len(SPECIALS)} specials come first), got "
                        f"{vocab_size!r}", "dataset.vocab_size", "Use e.g. 4096")
    return vocab_size


def _store_dir(root) -> Path:
    path = Path(root).expanduser() / STORE_KIND
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:   # a file on the way, no permission, read-only mount
        raise UserError(f"Cannot create the tokenizer store {path} ({type(exc).__name__}: "
                        f"{exc.strerror or exc})", "store.root",
                        "Point store.root at a writable directory") from None
    return path


def _entry_problem(entry: Path, key: str) -> str | None:
    """Why `entry` is not what `_build` published, or None. Every file is checked against the
    SHA-256 meta.json recorded (a few ms per MB), so a truncated or edited file is caught."""
    meta = read_json(entry / "meta.json")
    if not isinstance(meta, dict) or meta.get("key") != key \
            or not isinstance(meta.get("files"), dict):
        return "meta.json is missing, not JSON or not this entry's"
    for name, digest in meta["files"].items():
        f = entry / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its recorded SHA-256"
    if set(meta["files"]) != {"tokenizer.json", "ids.npy", "offsets.npy"}:
        return "meta.json lists other files than an entry holds"
    return None


def _damaged(entry: Path, why: str) -> UserError:
    return UserError(f"The tokenizer entry {entry} is damaged ({why})", "store.root",
                     f"Remove the folder {entry} (rm -r); the next run trains it again")


def _read_entry(entry: Path, key: str) -> tuple[BPETokenizer, list[np.ndarray]]:
    problem = _entry_problem(entry, key)
    if problem:
        raise _damaged(entry, problem)
    tok = BPETokenizer(_tokenizers().Tokenizer.from_file(str(entry / "tokenizer.json")), key)
    ids = np.load(entry / "ids.npy")
    offsets = np.load(entry / "offsets.npy")
    return tok, [ids[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _train(train_texts: Sequence[str], vocab_size: int):
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(train_texts), trainer)
    return tok


def _build(store: Path, key: str, documents: Sequence[str], train: Sequence[int],
           vocab_size: int, describe: dict) -> None:
    """Train, encode the corpus, publish. Call with the key's lock held."""
    staging = store / f".tmp-{key}"
    shutil.rmtree(staging, ignore_errors=True)   # a dead build's leftovers: the lock is ours
    staging.mkdir()
    tok = BPETokenizer(_train([documents[i] for i in train], vocab_size), key)
    text = tok._tok.to_str(pretty=False).encode()
    atomic_write_bytes(staging / "tokenizer.json", lambda fh: fh.write(text))
    encoded = tok.encode_batch(documents)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32   # half or a quarter of int64
    ids = np.concatenate(encoded).astype(dtype) if encoded else np.zeros(0, dtype)
    for name, array in (("ids.npy", ids), ("offsets.npy", offsets)):
        data = _npy(array)
        atomic_write_bytes(staging / name, lambda fh, d=data: fh.write(d))
    files = {n: sha256_file(staging / n) for n in ("tokenizer.json", "ids.npy", "offsets.npy")}
    write_json(staging / "meta.json", {  # last: its presence marks a complete build
        "key": key, "kind": "bpe", "vocab_size": tok.vocab_size, "specials": list(SPECIALS),
        "tokenizers": _tokenizers().__version__, "format": FORMAT, "files": files,
        "documents": len(documents), "tokens": int(offsets[-1]), **describe})
    final = store / key
    if final.exists():   # an incomplete leftover without a usable meta.json
        shutil.rmtree(final)
    os.replace(staging, final)


def prepare(kind: str, *, documents: Sequence[str], train: Sequence[int], corpus_hash: str,
            split: dict, vocab_size, root, on_build=None
            ) -> tuple[ByteTokenizer | BPETokenizer, list[np.ndarray]]:
    """The tokenizer of `kind` and every document's ids (int64 views; no `<eod>` appended).

    `bpe`: trained on `documents[i] for i in train`, looked up first in the store under `root`
    (the key covers `corpus_hash`, `split` and `vocab_size`); `on_build()` is called before a
    build (the caller's progress line)."""
    if kind == "byte":
        tok = ByteTokenizer()
        return tok, [tok.encode(d) for d in documents]
    if kind != "bpe":
        raise UserError(f"unknown tokenizer {kind!r}", "dataset.tokenizer",
                        f"Use one of {', '.join(KINDS)}")
    vocab_size = check_vocab_size(vocab_size)
    from filelock import FileLock

    store = _store_dir(root)
    key = bpe_key(corpus_hash, split, vocab_size)
    entry = store / key
    # flock: released by the kernel if the holder dies, so a crashed build never deadlocks
    with FileLock(str(store / f"{key}.lock")):
        if not (entry / "meta.json").is_file():
            if on_build is not None:
                on_build(key)
            _build(store, key, documents, train, vocab_size,
                   {"corpus_hash": corpus_hash, "split": split})
        tok, ids = _read_entry(entry, key)
    if len(ids) != len(documents):
        raise _damaged(entry, f"it encodes {len(ids)} documents, the corpus has {len(documents)}")
    return tok, [a.astype(np.int64) for a in ids]


def load(key: str, root) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a text bundle names in `identity["tokenizer"]` ("byte" or a store key)."""
    if key == "byte":
        return ByteTokenizer()
    entry = Path(root).expanduser() / STORE_KIND / str(key)
    if not (entry / "meta.json").is_file():
        raise UserError(f"No tokenizer {key!r} in the store {entry.parent}", "store.root",
                        "Point store.root at the store the data was built with (a run with "
                        "dataset=text trains it)")
    return _read_entry(entry, key)[0]
