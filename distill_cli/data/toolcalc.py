"""Synthetic tool-use data (`dataset=toolcalc`, task=agent): multi-step arithmetic questions with
a scripted trajectory that calls a calculator.

A question is a random expression tree of `operations` (2 or 3 by default) binary operators
from + - * over integer leaves in [min_leaf, max_leaf], every inner node but the root in
parentheses (no precedence to learn), every intermediate value in [0, max_value] (a `-` whose
left value is the smaller has its operands swapped; a tree with a value above max_value is drawn
again). E.g. (47*29)+312: a byte-level GPT of this size cannot multiply in its head; with the
calculator it only has to copy digits. One fixed text format (tasks/agent/tools.py):

    trajectory:  Q: (47*29)+312   \\n T: <c>47*29</c>=1363 <c>1363+312</c>=1675\\n A: 1675\\n
    answer:      Q: (47*29)+312   \\n A: 1675\\n          (the "final answers only" student)

(without the spaces around the line breaks). The calls are the tree's inner nodes in post-order,
each on the literal leaves or the previous results. The question is right-padded with spaces to
`question_width` characters, so the question line is always P = question_width + 4 tokens: the
decoder's prompt, and `loss=seqkd`'s `sequences.prompt_tokens`.

Questions: `seed` draws `questions` distinct expressions (Python's `random.Random`: the same on
every platform); `split_seed` splits them as task=lm's text splits its documents (test_fraction,
val_fraction, the rest train) — the split is BY QUESTION, and both renderings share it.

Blocks: ONE example per block, so evaluation is per question: bytes + `<eod>`, padded with
`<pad>` to block_size + 1 tokens; x = block[:-1], y = block[1:]. Targets are -100 on padding and
on the question (positions < P - 1: the model is never asked to predict the random operands —
counting them, a gpt_tiny-sized model had 0.6% success after 1,250 steps instead of 35% after
1,000, measured); the response, the tool outputs included, and the `<eod>` count (the tool's
bytes are forced at decoding time anyway; they count so that loss=lm_ce on the scripts and
loss=seqkd on the teacher's trajectories train on the same tokens). An example longer than
block_size is refused.

`rendering=answer` keeps the trajectory bundle as `teacher_data`: a teacher the store trains
for it learns the trajectories (the same teacher as the trajectory students').
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from distill_cli.data.bundle import DATA_VERSION, DataBundle, check_common
from distill_cli.data.text import TokenSplit, split_documents, split_identity
from distill_cli.data.tokenizer import ByteTokenizer
from distill_cli.errors import UserError

#: bump when a change here alters the questions, the format or the blocks a config yields
TOOLCALC_VERSION = 1
RENDERINGS = ("trajectory", "answer")
OPS = "+-*"
IGNORE = -100


@dataclass(frozen=True)
class Question:
    expr: str                 # e.g. "(47*29)+312"
    answer: int
    calls: tuple              # ((left, op, right, value), ...) in post-order
    steps: tuple              # the values of the inner nodes (the calls' true results)


def _tree(rng: random.Random, inner: int, lo: int, hi: int):
    """(text, value, calls) of a random tree with `inner` operators; calls in post-order."""
    if inner == 0:
        v = rng.randint(lo, hi)
        return str(v), v, []
    left_inner = rng.randint(0, inner - 1)
    lt, lv, lc = _tree(rng, left_inner, lo, hi)
    rt, rv, rc = _tree(rng, inner - 1 - left_inner, lo, hi)
    op = rng.choice(OPS)
    if op == "-" and lv < rv:          # keep every value >= 0
        (lt, lv, lc), (rt, rv, rc) = (rt, rv, rc), (lt, lv, lc)
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({lt}{op}{rt})", value, lc + rc + [(lv, op, rv, value)]


def draw_question(rng: random.Random, operations, lo: int, hi: int, max_value: int) -> Question:
    while True:
        text, value, calls = _tree(rng, rng.choice(operations), lo, hi)
        if all(c[3] <= max_value for c in calls):
            return Question(text[1:-1], value, tuple(calls), tuple(c[3] for c in calls))


def render(q: Question, rendering: str, width: int) -> str:
    head = f"Q: {q.expr.ljust(width)}\n"
    if rendering == "answer":
        return f"{head}A: {q.answer}\n"
    steps = " ".join(f"<c>{a}{op}{b}</c>={v}" for a, op, b, v in q.calls)
    return f"{head}T: {steps}\nA: {q.answer}\n"


def prompt_tokens(question_width: int) -> int:
    """The question line's length in tokens: "Q: " + the padded question + "\\n"."""
    return question_width + 4


class QuestionSplit(TokenSplit):
    """A split of one-question blocks (TokenSplit's batches and order) that also knows its
    questions: `questions` (Question per block, in order), `name`, `prompt_tokens`."""

    def __init__(self, x, y, questions, name: str, prompt_tokens: int):
        super().__init__(x, y)
        self.questions, self.name, self.prompt_tokens = tuple(questions), name, prompt_tokens

    def to(self, device) -> QuestionSplit:
        device = torch.device(device)
        if device == self.device:
            return self
        return QuestionSplit(self.x.to(device), self.y.to(device), self.questions, self.name,
                             self.prompt_tokens)

    def __repr__(self) -> str:
        return f"QuestionSplit({self.name}, n={len(self)}, block={self.x.shape[1]})"


def _blocks(texts, block_size: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = ByteTokenizer()
    n = len(texts)
    block = torch.full((n, block_size + 1), tok.pad_id, dtype=torch.int64)
    y = torch.full((n, block_size), IGNORE, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = torch.from_numpy(tok.encode(text))
        m = len(ids) + 1                                      # + <eod>
        block[i, :m - 1], block[i, m - 1] = ids, tok.eod_id
        y[i, head:m - 1] = block[i, head + 1:m]               # the response and <eod>
    return block[:, :-1].contiguous(), y


def _int(value, key: str, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key.split('.')[-1]} must be an integer >= {low}, got {value!r}", key,
                        fix)
    return value


def _check(rendering, operations, min_leaf, max_leaf, max_value, question_width, block_size,
           n, seed) -> list[int]:
    if rendering not in RENDERINGS:
        raise UserError(f"unknown rendering {rendering!r}", "dataset.rendering",
                        f"Use one of {', '.join(RENDERINGS)} (trajectory: tool calls + answer; "
                        "answer: the question and the final answer only)")
    ops = [operations] if isinstance(operations, (str, int)) else list(operations)
    if not ops or any(isinstance(o, bool) or not isinstance(o, int) or not 1 <= o <= 4
                      for o in ops):
        raise UserError(f"operations must be a list of operator counts in 1..4, got "
                        f"{operations!r}", "dataset.operations", "Use e.g. [2, 3]")
    _int(min_leaf, "dataset.min_leaf", 0, "Use e.g. 2")
    _int(max_leaf, "dataset.max_leaf", min_leaf, f"Use a value >= min_leaf ({min_leaf})")
    _int(max_value, "dataset.max_value", max_leaf, f"Use a value >= max_leaf ({max_leaf})")
    _int(question_width, "dataset.question_width", 1, "Use e.g. 15")
    _int(block_size, "dataset.block_size", 8, "Use e.g. 96")
    _int(n, "dataset.questions", 3, "Use e.g. 5000 (split into train, val and test)")
    _int(seed, "dataset.seed", 0, "Use a whole number >= 0")
    return sorted(set(ops))


def questions(operations, min_leaf: int, max_leaf: int, max_value: int, n: int, seed: int
              ) -> list[Question]:
    """`n` distinct questions in draw order (a pure function of the arguments)."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(50 * n + 1000):   # bounded: a tiny space of questions cannot loop forever
        q = draw_question(rng, operations, min_leaf, max_leaf, max_value)
        if q.expr not in seen:
            seen.add(q.expr)
            out.append(q)
            if len(out) == n:
                return out
    raise UserError(f"only {len(out)} distinct questions could be drawn of the {n} asked for",
                    "dataset.questions",
                    "Ask for fewer questions or widen dataset.max_leaf / dataset.operations")


def build(rendering: str = "trajectory", operations=[2, 3], min_leaf: int = 2,  # noqa: B006
          max_leaf: int = 99, max_value: int = 99999, question_width: int = 15,
          block_size: int = 96, questions: int = 5000, val_fraction: float = 0.1,
          test_fraction: float = 0.1, seed: int = 0, split_seed: int = 0,
          limit_train: int | None = None, limit_eval: int | None = None, root=None,
          download: bool = False, augment=None) -> DataBundle:
    """The `dataset=toolcalc` bundle. The split is text.py's `split_documents` over questions
    (test = the first round(n*test_fraction) of a split_seed permutation, val the next
    round(n*val_fraction), train the rest, each in draw order). `limit_train` / `limit_eval`
    keep the first N questions of train / of val and test (smoke runs; the split is unchanged).
    `root` / `download` are accepted like every dataset, unused; `operations` is never mutated
    (a list default, so the YAML restates it exactly)."""
    if augment:
        raise UserError("Question blocks have no augmentation", "dataset.augment",
                        "Drop dataset.augment (null) for dataset=toolcalc")
    check_common(val_fraction, split_seed, limit_train, limit_eval)
    args = (operations, min_leaf, max_leaf, max_value, question_width, block_size, questions,
            val_fraction, test_fraction, seed, split_seed, limit_train, limit_eval)
    data = _bundle(rendering, *args)
    if rendering != "trajectory":   # a teacher the store trains for it learns the trajectories
        data.teacher_data = _bundle("trajectory", *args)
    return data


def _bundle(rendering, operations, min_leaf, max_leaf, max_value, question_width, block_size,
            n, val_fraction, test_fraction, seed, split_seed, limit_train, limit_eval
            ) -> DataBundle:
    ops = _check(rendering, operations, min_leaf, max_leaf, max_value, question_width,
                 block_size, n, seed)
    pool = questions(ops, min_leaf, max_leaf, max_value, n, seed)
    widest = max(pool, key=lambda q: len(q.expr))
    if len(widest.expr) > question_width:
        raise UserError(f"the question {widest.expr!r} has {len(widest.expr)} characters, more "
                        f"than question_width={question_width}", "dataset.question_width",
                        f"Use question_width={len(widest.expr)} or more (it fixes the prompt "
                        "length: loss.sequences.prompt_tokens = question_width + 4)")
    train, val, test = split_documents(n, val_fraction=val_fraction,
                                       test_fraction=test_fraction, split_seed=split_seed)
    parts = {"train": train[:limit_train], "val": val[:limit_eval], "test": test[:limit_eval]}
    texts = {name: [render(pool[i], rendering, question_width) for i in idx]
             for name, idx in parts.items()}
    longest = max((t for ts in texts.values() for t in ts), key=len)
    if len(longest.encode()) > block_size:
        raise UserError(f"an example of {len(longest.encode())} tokens does not fit "
                        f"block_size={block_size} ({longest!r})", "dataset.block_size",
                        f"Use block_size={len(longest.encode())} or more")
    p = prompt_tokens(question_width)
    splits = {name: QuestionSplit(*_blocks(texts[name], block_size, p - 1),
                                  [pool[i] for i in idx], name, p)
              for name, idx in parts.items()}
    identity = {
        "name": "toolcalc", "data_version": DATA_VERSION, "toolcalc_version": TOOLCALC_VERSION,
        "rendering": rendering, "operations": ops, "min_leaf": min_leaf, "max_leaf": max_leaf,
        "max_value": max_value, "question_width": question_width, "prompt_tokens": p,
        "block_size": block_size, "questions": n,
        **split_identity(val_fraction, test_fraction, split_seed), "seed": seed,
        "limit_train": limit_train, "limit_eval": limit_eval,
        "tokenizer": "byte", "tokenizer_kind": "byte", "vocab_size": ByteTokenizer.vocab_size,
        "num_classes": ByteTokenizer.vocab_size, "input_shape": [block_size], "augment": None,
        "sizes": {k: len(s) for k, s in splits.items()}}
    return DataBundle(name="toolcalc", num_classes=ByteTokenizer.vocab_size,
                      input_shape=(1, block_size), identity=identity, **splits)
