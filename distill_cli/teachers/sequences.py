"""An LM teacher's continuations of the training blocks, generated once and served by index
(sequence-level KD, Kim & Rush 2016: the student trains on the teacher's outputs).

Row i belongs to training block i (x = block[:-1], y = block[1:], T + 1 tokens): the teacher is
given the block's first `prompt_tokens` tokens (P, as they are: the split's last, padded block
may hold <pad> there) and continues them to the full block length T + 1, one token at a time with
a key/value cache. `temperature` 0 (the default) is greedy decoding — the beam-1 approximation of
Kim & Rush's beam search (they use beam 5; beam search is not implemented); > 0 samples from
softmax(logits / temperature), restricted to the `top_k` largest logits when set, drawing from
one generator per chunk of `batch_size` rows seeded with derive_seed("sequences", seed, chunk),
so a row is a pure function of (seed, i) for a given batch_size (part of the key when sampling).

Why its own decode loop and not `GPT.generate`: generate keeps T0 + n <= the context T so its
result can be scored by one forward, which stops one token short of a block of T + 1. The loop
below is generate's (the same cached forward, `GPT._pick`, float32 logits) run one step
further: the last token's position is never fed, so the context still suffices.

Storage: the output store (outputs.py `TableStore`), `<store.root>/outputs/<key>/sequences.npy`
[N, T + 1], the ids as FLOAT32 — exact for every integer below 2^24 (a vocabulary of up to
16,777,216 tokens; a larger one is refused), the same 4 bytes an int32 would take, and no change
to the store's float-only tables (hashes, finite checks); served as int64. Keyed by the
teacher's WEIGHTS (teachers/samples.py `weights_digest`), the data identity, prompt_tokens and
the decoding (greedy; or temperature, top_k, seed, batch_size and the device type, whose
generator streams differ), so every student and seed of a sweep reuses one table.

Tool use (`tools`, default null: the plain decoding above): with `tools=calc` the teacher
decodes with the calculator in the loop (tasks/agent/tools.py `run_episodes`, task=agent's
dataset=toolcalc): a tool call's result is forced into the row as the tool's output, decoding ends
after the answer line, and the row is filled with `<eod>` then `<pad>` (the data's layout), so
the stored trajectories carry real tool results. The prompt must then be the question line
exactly (`prompt_tokens` = the data's `prompt_tokens`); `tools` joins the key only when set, so
plain tables keep their keys.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.teachers.outputs import TableStore
from distill_cli.teachers.samples import weights_digest
from distill_cli.teachers.store import content_key

FORMAT = 1
EXACT_IDS = 2 ** 24   # float32 holds every integer in [0, 2^24] exactly
OPTIONS = ("prompt_tokens", "temperature", "top_k", "seed", "batch_size", "tools")
KEY = "loss.sequences"


def _bad(name: str, value, want: str, fix: str) -> UserError:
    return UserError(f"{name} must be {want}, got {value!r}", f"{KEY}.{name}", fix)


def _int(value, name: str, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or int(value) < low:
        raise _bad(name, value, f"an integer >= {low}", fix)
    return int(value)


def check_options(prompt_tokens=16, temperature=0.0, top_k=None, seed=0, batch_size=256,
                  tools=None, **unknown) -> dict:
    """The options as teacher_sequences takes them, checked (UserError key
    `loss.sequences.<name>`); the prompt's length against the block is checked with the data."""
    if unknown:
        name = min(unknown)
        raise UserError(f"{KEY} has no option {name!r}", f"{KEY}.{name}",
                        f"Use only: {', '.join(OPTIONS)}")
    prompt_tokens = _int(prompt_tokens, "prompt_tokens", 1,
                         "Give the number of real tokens the teacher continues, e.g. 16")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature >= 0):
        raise _bad("temperature", temperature, "a finite number >= 0",
                   "Use 0 (greedy: Kim & Rush's beam-1 approximation) or e.g. 1.0 (sampling)")
    if top_k is not None:
        top_k = _int(top_k, "top_k", 1, "Use null (the whole vocabulary) or e.g. 50")
    if tools is not None:
        from distill_cli.tasks.agent.tools import TOOLS
        if tools not in TOOLS:
            raise _bad("tools", tools, f"null or one of {', '.join(TOOLS)}",
                       "Use null (plain decoding) or calc (the calculator in the loop: "
                       "task=agent, dataset=toolcalc)")
    return {"prompt_tokens": prompt_tokens, "temperature": float(temperature), "top_k": top_k,
            "seed": _int(seed, "seed", 0, "Use a whole number >= 0"),
            "batch_size": _int(batch_size, "batch_size", 1, "Use e.g. 256"), "tools": tools}


class TeacherSequences:
    """`get(index)` -> int64 ids `[B, T + 1]` of training blocks `index`, on `index`'s device
    (positions < prompt_tokens: the real block's; the rest: the teacher's)."""

    def __init__(self, ids: torch.Tensor, prompt_tokens: int, key: str, built: bool):
        self.ids, self.prompt_tokens, self.key, self.built = ids, prompt_tokens, key, built

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.ids.index_select(0, index.to(self.ids.device)).to(index.device)


@torch.no_grad()
def continue_blocks(teacher, prompts: torch.Tensor, length: int, temperature: float,
                    top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """prompts [B, P] continued to [B, length] (length <= the teacher's context + 1): the
    teacher's own cached `generate`, its last token never fed (`last_unfed`)."""
    return teacher.generate(prompts, length - prompts.shape[1], temperature=temperature,
                            top_k=top_k, generator=generator, last_unfed=True)


def _check(teacher, data, prompt_tokens: int) -> tuple[int, int]:
    """(T, V) of the data, or a UserError: an LM teacher, a prompt shorter than the block, ids
    that float32 holds exactly."""
    if not (hasattr(teacher, "new_cache") and hasattr(teacher, "_pick")):
        raise UserError("Sequence-level KD continues the training blocks with the teacher, but "
                        f"the run's teacher ({type(teacher).__name__}) is not a language model "
                        "with cached decoding", "teacher",
                        "Use task=lm with a GPT teacher (teacher=gpt_small or a checkpoint of one)")
    T, V = int(data.input_shape[-1]), int(data.num_classes)
    if prompt_tokens >= T:
        raise UserError(f"prompt_tokens={prompt_tokens} leaves the teacher nothing to generate "
                        f"before the block's last input position (dataset.block_size={T})",
                        f"{KEY}.prompt_tokens", f"Use prompt_tokens < {T} (e.g. {max(1, T // 4)})")
    if T > teacher.block_size:
        raise UserError(f"the teacher's context ({teacher.block_size} tokens) is shorter than "
                        f"the blocks ({T})", "teacher",
                        f"Use a teacher trained on dataset.block_size={T}")
    if V > EXACT_IDS:
        raise UserError(f"a vocabulary of {V} tokens does not fit the store's float32 ids "
                        f"(exact below 2^24)", "dataset.vocab_size", "Use a smaller vocabulary")
    return T, V


def _check_tools(data, prompt_tokens: int) -> None:
    """Tool use decodes byte ids from the question line: the data must say where it ends."""
    want = data.identity.get("prompt_tokens")
    if data.identity.get("tokenizer") != "byte" or want is None:
        raise UserError(f"{KEY}.tools decodes tool-using episodes from question lines, but "
                        f"dataset={data.name} has none", f"{KEY}.tools",
                        "Use dataset=toolcalc (task=agent), or loss.sequences.tools=null")
    if prompt_tokens != want:
        raise UserError(f"with tools the teacher continues the question line, {want} tokens "
                        f"(dataset.question_width + 4), not {prompt_tokens}",
                        f"{KEY}.prompt_tokens", f"Use {KEY}.prompt_tokens={want}")


def teacher_sequences(teacher, data, *, store_root: str, prompt_tokens: int = 16,
                      temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                      batch_size: int = 256, tools: str | None = None) -> TeacherSequences:
    """The teacher's sequences for every training block of `data` (computed once)."""
    opts = check_options(prompt_tokens, temperature, top_k, seed, batch_size, tools)
    P, temperature, top_k = opts["prompt_tokens"], opts["temperature"], opts["top_k"]
    T, V = _check(teacher, data, P)
    if tools is not None:
        _check_tools(data, P)
    device = next(teacher.parameters()).device
    train = data.train
    n = len(train)
    sampling = temperature > 0
    decode = ({"decode": "sample", "temperature": temperature, "top_k": top_k,
               "seed": opts["seed"], "batch_size": opts["batch_size"], "device": device.type}
              if sampling else {"decode": "greedy"})   # greedy: seed/top_k/batch do not matter
    ident = {"format": FORMAT, "teacher": weights_digest(teacher), "data": data.identity,
             "prompt_tokens": P, **decode, "stored": "float32 ids", "n": n,
             **({"tools": tools} if tools is not None else {})}
    key = content_key(ident)

    def compute() -> np.ndarray:
        print(f"teacher sequences: continuing {n} blocks from {P} tokens to {T + 1} "
              f"({'sampled' if sampling else 'greedy'}"
              f"{', tools: ' + tools if tools else ''}) once (store key {key})",
              file=sys.stderr, flush=True)
        out = torch.empty(n, T + 1, dtype=torch.float32)
        was = teacher.training
        teacher.eval()
        try:
            bs = opts["batch_size"]
            for chunk, start in enumerate(range(0, n, bs)):
                rows = torch.arange(start, min(start + bs, n), device=train.x.device)
                prompts = train.x.index_select(0, rows)[:, :P].to(device)
                g = torch.Generator(device=device).manual_seed(
                    derive_seed("sequences", opts["seed"], chunk)) if sampling else None
                if tools is None:
                    seq = continue_blocks(teacher, prompts, T + 1, temperature, top_k, g)
                else:   # the calculator in the loop (tasks/agent/tools.py)
                    from distill_cli.tasks.agent.tools import run_episodes
                    seq = run_episodes(teacher, prompts, T + 1, temperature=temperature,
                                       top_k=top_k, generator=g)[0]
                out[start:start + len(rows)] = seq.cpu().to(torch.float32)
        finally:
            teacher.train(was)
        return out.numpy()

    tables = TableStore(store_root, (T + 1,), "float32")
    arr = tables.get(key, "sequences", n, compute)
    ids = torch.from_numpy(np.array(arr, dtype=np.float32)).to(torch.int64)
    if int(ids.min()) < 0 or int(ids.max()) >= V:   # the hash matched: a bug, not damage
        raise RuntimeError(f"stored sequences {key} hold ids outside [0, {V})")
    return TeacherSequences(ids.to(device), P, key, built=bool(tables.built))
