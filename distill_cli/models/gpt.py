"""`gpt`: a nanoGPT-style decoder-only transformer (Radford et al. 2019, GPT-2; Karpathy's
nanoGPT for the layout and init), the language-model family's student and teacher.

ids [B, T] (int64, T <= the context length `input_size[0]`) -> token embedding `wte` (+ learned
position embedding `wpe`, or rotary positions inside attention) -> `n_layers` pre-norm blocks
(x + attn(ln_1(x)); x + mlp(ln_2(x))) -> final LayerNorm `ln_f` -> `lm_head` -> logits [B, T, V]
with V = num_classes, the vocabulary size (in_channels is ignored: the inputs are ids).

Choices and their sources:
* causal attention through `F.scaled_dot_product_attention` (`is_causal=True` without a cache;
  with a cache, an explicit mask, because SDPA's `is_causal` aligns the mask top-left when
  queries are fewer than keys); exact-erf GELU MLP of width `d_ff` (4 * d_model, GPT-2);
* RoPE (Su et al. 2021, RoFormer) with base 10000 on q and k, in the GPT-NeoX / LLaMA pairing:
  dimension i is rotated with i + head_dim/2 by the angle pos * base^(-2i/head_dim);
* `tie_embeddings` (Press & Wolf 2017, as GPT-2): `lm_head.weight` IS `wte.weight`, one
  Parameter; `lm_head` stays an `nn.Linear` so the zoo's classifier contract holds;
* `bias=False` (nanoGPT's option): no bias in the Linear layers and LayerNorms; `lm_head` never
  has one (tied or not);
* GPT-2 init: Linear and Embedding weights N(0, 0.02), zero biases, LayerNorm 1/0, and the two
  residual projections of each block (`attn.proj`, `mlp.c_proj`) N(0, 0.02 / sqrt(2 n_layers));
* dropout (nanoGPT): on the embedded tokens, the attention probabilities (training only), and
  after each residual projection.

Zoo contract: `stages` = every block's output `blocks.<i>` (the residual stream [B, T, D]),
`feature_dim` = d_model, `classifier` = "lm_head" (its input, `ClassifierInput`, is the per-token
[B, T, D] feature, not a pooled vector).

Decoding: `generate` runs incremental decoding with a per-layer key/value cache (`GPTCache`),
positions offset by the tokens already cached; `forward(ids, cache)` is the same step in public.
It samples from one generator for the batch, or from one generator PER ROW (a row's tokens then
depend on its own generator only, not on the rows it is batched with: on-policy distillation
under torchrun draws on each rank what one process draws for the same samples).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.registry import register

POSITIONS = ("rope", "learned")
ROPE_BASE = 10000.0


# ---------------------------------------------------------------- rotary positions

def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype,
                base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, head_dim/2], of the angles positions[t] * base^(-2i/head_dim).
    Computed in `dtype` (float32, or float64 for a float64 model) from integer positions, so the
    cached and the full forward get bit-identical tables for the same position."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device)
                        / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim]: the pair (x_i, x_{i+h}), h = head_dim/2, by angle_i."""
    h = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # autocast: q/k may be bf16
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ---------------------------------------------------------------- key/value cache

class LayerCache:
    """One layer's keys and values [B, H, capacity, head_dim], preallocated on first use (no
    re-concatenation per step); `length` positions are filled."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values [B, H, t, hd]; return all cached ones [B, H, length, hd]."""
        t = k.shape[2]
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; "
                             f"{self.length} + {t} do not fit")
        if self.k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class GPTCache:
    """Every layer's `LayerCache`; `length` = the positions already decoded (the offset of the
    next token's position). Make one with `GPT.new_cache`."""

    def __init__(self, n_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.layers[0].length


# ---------------------------------------------------------------- the network

class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)  # a residual projection (init)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        drop = self.dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0..past+i (one query: all)
            mask = None if t == 1 else torch.ones(t, past + t, dtype=torch.bool,
                                                  device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(d_ff, d_model, bias=bias)  # a residual projection (init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, d_ff, dropout, bias)

    def forward(self, x: torch.Tensor, rope: tuple | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """ids [B, T] -> logits [B, T, vocab_size]; stages `blocks.<i>` ([B, T, d_model] each)."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_layers: int,
                 n_heads: int, d_ff: int, positions: str, dropout: float,
                 tie_embeddings: bool, bias: bool):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.head_dim, self.positions = d_model // n_heads, positions
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout, bias)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        if tie_embeddings:  # one Parameter under two names; wte's init is the one kept
            self.lm_head.weight = self.wte.weight
        self.stages = tuple(f"blocks.{i}" for i in range(n_layers))
        self.feature_dim = d_model
        self.classifier = "lm_head"

    def _init_weights(self, n_layers: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: scale the residual projections so the stream's variance does not grow with depth
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def new_cache(self, capacity: int | None = None) -> GPTCache:
        """An empty key/value cache for up to `capacity` positions (default: the context)."""
        capacity = self.block_size if capacity is None else int(capacity)
        if not 1 <= capacity <= self.block_size:
            raise ValueError(f"cache capacity {capacity} is outside 1..{self.block_size} "
                             f"(the model's context length)")
        return GPTCache(len(self.blocks), capacity)

    def forward(self, ids: torch.Tensor, cache: GPTCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T]. With `cache`, ids continue the cached sequence: their
        positions start at `cache.length`, and their keys/values are appended to it."""
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"gpt takes token ids [B, T] of dtype int64, got a "
                             f"{ids.dtype} tensor of shape {tuple(ids.shape)}")
        t = ids.shape[1]
        offset = 0 if cache is None else cache.length
        if offset + t > self.block_size:
            raise ValueError(f"sequence of {offset + t} tokens is longer than the model's "
                             f"context length {self.block_size}")
        x = self.wte(ids)
        pos = torch.arange(offset, offset + t, device=ids.device)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            rope = rope_tables(pos, self.head_dim, dtype)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layers[i])
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 eos_id: int | None = None, return_logprobs: bool = False,
                 last_unfed: bool = False):
        """Continue the prompts ids [B, T0] by up to `max_new_tokens` tokens -> [B, T0 + n].

        Samples from softmax(logits / temperature) restricted to the `top_k` largest logits,
        drawing from `generator` (same seed, same samples); `temperature == 0` is greedy (argmax).
        A row that emitted `eos_id` is filled with `eos_id` afterwards; decoding stops early
        (n < max_new_tokens) once every row has. Runs in eval mode (no dropout) and restores the
        previous mode. The whole result must fit the context (T0 + max_new_tokens <= T), so it
        can be scored by a forward pass; a longer request is a ValueError.

        `generator` may also be a list of B generators, one per row (on any device): row i then
        draws `max_new_tokens` float64 uniforms u from its own generator up front and its j-th
        new token is the inverse CDF of its distribution at u[j] (the first token whose
        cumulative probability exceeds u[j] times the total) — an exact sample whose value
        depends on row i's prompt and generator only, whatever else is in the batch.

        `last_unfed=True` allows T0 + max_new_tokens = T + 1: the last new token is returned but
        never fed (no position of its own is needed), so a result of T + 1 tokens is a full
        block for a model of context T: inputs out[:, :-1], next-token targets out[:, 1:].

        `return_logprobs=True` returns (ids, logprobs [B, n]): log p(token | prefix) of each new
        token under the MODEL's distribution (temperature 1, no top-k), 0 after a row's eos.
        """
        b, t0 = self._check_generate(ids, max_new_tokens, temperature, top_k, eos_id,
                                     last_unfed)
        max_new_tokens = int(max_new_tokens)
        uniforms = None
        if isinstance(generator, (list, tuple)):
            uniforms = self._row_uniforms(generator, b, max_new_tokens, temperature, ids.device)
        was_training = self.training
        self.eval()
        try:
            # the last new token is never fed: its position needs no cache slot
            cache = self.new_cache(t0 + max_new_tokens - 1) if max_new_tokens else None
            tokens, logprobs = [ids], []
            done = torch.zeros(b, dtype=torch.bool, device=ids.device)
            logits = self(ids, cache)[:, -1] if max_new_tokens else None
            for step in range(max_new_tokens):
                logits = logits if logits.dtype == torch.float64 else logits.float()
                if uniforms is None:
                    tok = self._pick(logits, temperature, top_k, generator)
                else:
                    tok = self._pick_rows(logits, temperature, top_k, uniforms[:, step])
                lp = F.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
                if eos_id is not None:
                    tok = tok.masked_fill(done, eos_id)
                    lp = lp.masked_fill(done, 0.0)
                    done = done | (tok == eos_id)
                tokens.append(tok[:, None])
                logprobs.append(lp)
                if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                    break
                logits = self(tok[:, None].to(ids.dtype), cache)[:, -1]
        finally:
            self.train(was_training)
        out = torch.cat(tokens, dim=1)
        if not return_logprobs:
            return out
        lps = torch.stack(logprobs, 1) if logprobs else ids.new_zeros(b, 0, dtype=torch.float32)
        return out, lps

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        """The next token [B] from last-position logits [B, V] (float32 or float64)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = GPT._sampling_probs(logits, temperature, top_k)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @staticmethod
    def _sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None
                        ) -> torch.Tensor:
        """softmax(logits / temperature) over the `top_k` largest logits (0 elsewhere)."""
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return F.softmax(logits, dim=-1)

    @staticmethod
    def _pick_rows(logits: torch.Tensor, temperature: float, top_k: int | None,
                   u: torch.Tensor) -> torch.Tensor:
        """The next token [B] by inverse CDF: row i's first token whose cumulative
        probability (float64) exceeds u[i] * the row's total. A token of probability 0 is never
        chosen (its cumulative value equals its predecessor's)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        cdf = GPT._sampling_probs(logits, temperature, top_k).double().cumsum(-1)
        target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        tok = torch.searchsorted(cdf, target, right=True)[:, 0]
        return tok.clamp_max(logits.shape[-1] - 1)   # u * total rounding up to the total

    @staticmethod
    def _row_uniforms(generators, b: int, n: int, temperature: float, device
                      ) -> torch.Tensor | None:
        """[B, n] float64 uniforms on `device`, row i from generators[i] (None when greedy:
        nothing is drawn)."""
        if len(generators) != b or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"a list of generators needs one torch.Generator per prompt row "
                             f"({b}), got {len(generators)} items")
        if temperature == 0:
            return None
        if b == 0:
            return torch.zeros(0, n, dtype=torch.float64, device=device)
        return torch.stack([torch.rand(n, generator=g, dtype=torch.float64, device=g.device)
                            .to(device) for g in generators])

    def _check_generate(self, ids, max_new_tokens, temperature, top_k, eos_id,
                        last_unfed=False):
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[1] < 1:
            raise ValueError(f"generate takes prompts of token ids [B, T0] (int64, T0 >= 1), got "
                             f"a {ids.dtype} tensor of shape {tuple(ids.shape)}")
        b, t0 = ids.shape
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
        room = self.block_size + (1 if last_unfed else 0)   # the unfed last token: no position
        if t0 + max_new_tokens > room:
            raise ValueError(f"prompt of {t0} tokens + {max_new_tokens} new ones is longer than "
                             f"the model's context length {self.block_size}"
                             + (" + 1 (last_unfed)" if last_unfed else ""))
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got "
                             f"{temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if eos_id is not None and not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        if b and t0 and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"prompt ids must lie in 0..{self.vocab_size - 1}")
        return b, t0


def _option_error(what: str, key: str, fix: str) -> UserError:
    return UserError(f"Architecture 'gpt': {what}", key=key,
                     fix=f"set student.{key} (or teacher.{key}) {fix}")


@register("gpt", input_dims=1)
def gpt(num_classes: int, in_channels: int, input_size: tuple[int, ...], *, d_model: int = 128,
        n_layers: int = 4, n_heads: int = 4, d_ff: int | None = None, positions: str = "rope",
        dropout: float = 0.0, tie_embeddings: bool = True, bias: bool = False) -> GPT:
    """num_classes = the vocabulary size, input_size = (T,) the context length; `in_channels`
    is ignored (the inputs are token ids)."""
    (block_size,) = (int(s) for s in input_size)
    d_model, n_layers, n_heads = int(d_model), int(n_layers), int(n_heads)
    d_ff = 4 * d_model if d_ff is None else int(d_ff)
    if int(num_classes) < 1 or block_size < 1:
        raise UserError(f"Architecture 'gpt' needs a vocabulary and a context length >= 1, got "
                        f"vocabulary {num_classes} and context {block_size}", key="arch",
                        fix="use gpt with a text dataset (its vocabulary size and context)")
    if d_model < 1 or n_layers < 1 or d_ff < 1:
        raise _option_error(f"d_model={d_model}, n_layers={n_layers}, d_ff={d_ff}",
                            "n_layers" if n_layers < 1 else "d_model" if d_model < 1 else "d_ff",
                            "to 1 or more")
    if n_heads < 1 or d_model % n_heads:
        raise _option_error(f"d_model={d_model} is not divisible by n_heads={n_heads}",
                            "n_heads", "to a divisor of d_model, e.g. d_model=128 n_heads=4")
    if positions not in POSITIONS:
        raise _option_error(f"positions={positions!r}", "positions",
                            f"to one of: {', '.join(POSITIONS)}")
    if positions == "rope" and (d_model // n_heads) % 2:
        raise _option_error(f"RoPE rotates pairs of dimensions, but the head width "
                            f"d_model/n_heads = {d_model // n_heads} is odd", "n_heads",
                            "so that d_model/n_heads is even (or positions=learned)")
    if not 0.0 <= float(dropout) < 1.0:
        raise _option_error(f"dropout={dropout}", "dropout", "to a value in [0, 1)")
    return GPT(int(num_classes), block_size, d_model, n_layers, n_heads, d_ff, positions,
               float(dropout), bool(tie_embeddings), bool(bias))
