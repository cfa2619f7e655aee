"""The calculator tool and the tool-executing decoder of the agent task (task=agent).

Trajectory format (data/toolcalc.py renders the scripted ones; bytes, one example per block):

    Q: (47*29)+312     \n        the question, right-padded with spaces to a fixed width
    T: <c>47*29</c>=1363 <c>1363+312</c>=1675\n
    A: 1675\n

A tool call is `<c>EXPR</c>`. When the MODEL emits the last byte of the close tag `</c>`, the
runtime evaluates EXPR (the text since the last `<c>`) with `calc` and appends `=RESULT` — or
`=ERR` for a malformed call (no open tag, not arithmetic, too large) — as the tool's output: those
bytes are forced into the stream, one per decoding step, whatever the model would have said.
Decoding continues until the model ends a line that starts with `A: ` (the answer line), emits
`<eod>`, or runs out of context; then the row gets `<eod>` and `<pad>` to the end (the data's
layout). The prompt's tokens go through the same KV cache as the generated ones.

`calc` is a SAFE evaluator: `ast.parse` of at most MAX_CHARS characters, integer literals, the
binary operators + - * // and unary + -, parentheses (the parser's grouping), depth at most
MAX_DEPTH, every intermediate result at most MAX_ABS in magnitude (checked before a product is
formed, so no huge number is ever built). Names, attributes, calls, subscripts, floats, strings,
`**`, `/`, `%`, comparisons: refused. Never eval().
"""
from __future__ import annotations

import ast
from collections import deque

import torch

OPEN, CLOSE = b"<c>", b"</c>"
ANSWER = b"A: "
ERROR = b"=ERR"
EOD, PAD = 256, 257      # the byte tokenizer's specials (data/tokenizer.py ByteTokenizer)
NEWLINE = ord("\n")
MAX_CHARS = 64
MAX_DEPTH = 12
MAX_ABS = 10 ** 15
TOOLS = ("calc",)        # loss.sequences.tools / the decoder's tool names


class ToolError(ValueError):
    """A call the calculator refuses (the runtime answers `=ERR`)."""


_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b}


def _bounded(value: int) -> int:
    if abs(value) > MAX_ABS:
        raise ToolError(f"result exceeds {MAX_ABS:.0e} in magnitude")
    return value


def _eval(node: ast.AST, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise ToolError(f"nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:   # bool is an int subclass: refused too
            raise ToolError(f"{node.value!r} is not an integer literal")
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.FloorDiv):
            if b == 0:
                raise ToolError("division by zero")
            return a // b
        if isinstance(node.op, ast.Mult) and a and b and \
                abs(a).bit_length() + abs(b).bit_length() > MAX_ABS.bit_length() + 1:
            raise ToolError(f"product exceeds {MAX_ABS:.0e} in magnitude")   # never built
        if type(node.op) in _BINARY:
            return _bounded(_BINARY[type(node.op)](a, b))
        raise ToolError(f"operator {type(node.op).__name__} is not allowed (+ - * // only)")
    raise ToolError(f"{type(node).__name__} is not allowed (integers, + - * //, parentheses)")


def calc(expr: str) -> int:
    """The integer value of an arithmetic expression, or ToolError."""
    if not isinstance(expr, str) or not expr.strip():
        raise ToolError("empty expression")
    if len(expr) > MAX_CHARS:
        raise ToolError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:   # ValueError: null bytes
        raise ToolError(f"not an expression ({exc.__class__.__name__})") from None
    return _eval(tree.body, 0)


class ToolSplicer:
    """One episode's runtime over the token stream after the prompt. `model_token(t)` takes a
    token the MODEL emitted and returns the tokens the tool forces next (its output, or none);
    `done` once the answer line ended, the model emitted a special token, or `finish()`.

    `text` holds every byte after the prompt (the model's and the tool's); `calls` one
    (expression, value or None) per call; `answer` the answer line's text (None: none)."""

    def __init__(self):
        self.text = bytearray()
        self.calls: list[tuple[str, int | None]] = []
        self.answer: str | None = None
        self.done = False

    def model_token(self, token: int) -> list[int]:
        if self.done:
            raise RuntimeError("the episode is over")
        if not 0 <= token < 256:   # <eod> / <pad>: the model ended without an answer line
            self.done = True
            return []
        self.text.append(token)
        if self.text.endswith(CLOSE):
            out = self._call(bytes(self.text[:-len(CLOSE)]))
            self.text += out
            return list(out)
        if token == NEWLINE:
            line = self.text[:-1].rsplit(b"\n", 1)[-1]
            if line.startswith(ANSWER):
                self.answer = line[len(ANSWER):].decode("utf-8", errors="replace").strip()
                self.done = True
        return []

    def _call(self, before: bytes) -> bytes:
        start = before.rfind(OPEN)
        if start < 0 or before.rfind(CLOSE) > start:   # a close tag with no open one
            self.calls.append(("", None))
            return ERROR
        expr = before[start + len(OPEN):].decode("utf-8", errors="replace")
        try:
            value = calc(expr)
        except ToolError:
            self.calls.append((expr, None))
            return ERROR
        self.calls.append((expr, value))
        return b"=" + str(value).encode()

    def finish(self) -> None:
        """The context ran out: the episode ends where it is (no answer unless it had one)."""
        self.done = True

    def stats(self, truth: int, steps) -> list[float]:
        """[success, answered, calls, correct calls, malformed calls] against the true answer
        and the true intermediate results `steps` (a call is correct when its result is one)."""
        good = {int(s) for s in steps}
        correct = sum(1 for _, v in self.calls if v is not None and v in good)
        malformed = sum(1 for _, v in self.calls if v is None)
        answered = self.answer is not None and _is_int(self.answer)
        return [float(answered and self.answer == str(int(truth))), float(answered),
                float(len(self.calls)), float(correct), float(malformed)]


STATS = ("success", "answered", "calls", "correct_calls", "malformed_calls")


def _is_int(text: str) -> bool:
    body = text.removeprefix("-")
    return body.isdigit() and body.isascii()


@torch.no_grad()
def run_episodes(model, prompts: torch.Tensor, length: int, *, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, list[ToolSplicer]]:
    """Continue prompts [B, P] (byte ids) to [B, length] with the calculator in the loop.

    length <= the model's context + 1 (the last token is never fed). Greedy at temperature 0,
    else sampled from softmax(logits / temperature) (top_k) with `generator` — the model's own
    `_pick`, as GPT.generate. Every row advances one token per step, so the KV cache stays
    aligned: a tool's output is forced one token per step (fed through the cache like any
    token). Stops early once every row has ended (its `<eod>` written); the rest is `<pad>`."""
    b, p = prompts.shape
    if not p < length <= model.block_size + 1:
        raise ValueError(f"length {length} must exceed the prompt ({p}) and fit the context "
                         f"{model.block_size} + 1")
    was = model.training
    model.eval()
    device = prompts.device
    out = torch.full((b, length), PAD, dtype=torch.int64, device=device)
    out[:, :p] = prompts
    episodes = [ToolSplicer() for _ in range(b)]
    pending: list[deque] = [deque() for _ in range(b)]
    closed = [False] * b           # the row's <eod> is written
    try:
        cache = model.new_cache(length - 1)
        logits = model(prompts, cache)[:, -1]
        for pos in range(p, length):
            logits = logits if logits.dtype == torch.float64 else logits.float()
            pick = model._pick(logits, temperature, top_k, generator).tolist()
            column = []
            for i, ep in enumerate(episodes):
                if pending[i]:
                    tok = pending[i].popleft()
                elif ep.done:
                    tok = PAD if closed[i] else EOD
                    closed[i] = True
                else:
                    tok = int(pick[i])
                    pending[i].extend(ep.model_token(tok))
                    closed[i] = ep.done and tok == EOD
                column.append(tok)
            out[:, pos] = torch.tensor(column, dtype=torch.int64, device=device)
            if all(closed):
                break
            if pos + 1 < length:
                logits = model(out[:, pos:pos + 1], cache)[:, -1]
    finally:
        model.train(was)
    for ep in episodes:
        if not ep.done:
            ep.finish()
    return out, episodes
