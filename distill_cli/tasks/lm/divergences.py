"""Token-level divergences for language-model distillation (METHODS_FAMILIES.md B1–B4, B6).

Pure functions on logits `[..., V]` returning one value per position `[...]`: no reduction, no
padding mask, no detach. The objectives in `methods/` detach the teacher, mask the padding
(`targets == IGNORE_INDEX`) and average over the counted tokens (`token_mean`).

Notation: p = the teacher's distribution, q = the student's, both `softmax(z / T)`.
Every value is the true divergence (entropy terms included): the authors' codes log
cross-entropy forms for FKL/SKL (teacher entropy dropped) — same gradients, values offset by H(p).

Numerics: log-softmax in float32 at least (half/bfloat16 are upcast, float64 kept); mixtures are
taken in PROBABILITY space through a log-sum-exp of weighted log-probabilities (never the
geometric mix `β log p + (1−β) log q`, TRL's old bug); a term whose weighting probability is 0
counts 0 (0·log 0 = 0) with a finite gradient, so `-inf` logits (a masked vocabulary slot) are
safe. A token the teacher gives mass but the student none makes the KL +inf, as it should.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill_cli.losses.functional import as_float

__all__ = [
    "IGNORE_INDEX",
    "counted",
    "forward_kl",
    "generalized_jsd",
    "kl_from_log_probs",
    "log_probs",
    "pack_topk",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "token_mean",
    "token_nll",
    "topk_kl",
    "topk_kl_live",
    "total_variation",
    "unpack_topk",
]

IGNORE_INDEX = -100  # a target that does not count (padding, prompt), as torch/TRL/DistiLLM
_MAX_PACKED_VOCAB = 2 ** 24  # vocabulary indices are exact in float32 below this


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log_softmax(z / T)` over the last dimension, in float32 at least."""
    z = as_float(logits)
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`KL(p ‖ q) = Σ_v p (log p − log q)` per position, from log-probabilities.

    Slots with p = 0 count exactly 0 and pass a zero (not NaN) gradient to both sides: their
    log-values are replaced before the product, so `0·(−inf)` never appears, forward or back.
    """
    p = log_p.exp()
    keep = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    return (p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero))).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """`log(w·a + (1−w)·b)` — the mixture in probability space, as a log-sum-exp.

    A slot where both a and b are 0 would give log 0 = −inf with a NaN gradient (0/0); such
    slots carry no weight in any KL taken against the mixture (kl_from_log_probs drops them),
    so they are filled with a finite placeholder first.
    """
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    dead = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    a = torch.where(dead, zero, log_a) + math.log(w)
    b = torch.where(dead, zero, log_b) + math.log1p(-w)
    return torch.logaddexp(a, b)


# ----------------------------------------------------------------------------- dense divergences
def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """`KL(p ‖ q)` (mode-covering), p = softmax(z_T/T), q = softmax(z_S/T); no T² here."""
    return kl_from_log_probs(log_probs(teacher_logits, temperature),
                             log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """`KL(q ‖ p)` (mode-seeking); the gradient flows through q in both factors."""
    return kl_from_log_probs(log_probs(student_logits, temperature),
                             log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """TRL's generalized JSD (GKD, Agarwal et al. 2024, Eq. 1):

        m = β·p + (1−β)·q,   JSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m)

    with TRL's endpoints special-cased UNSCALED: β = 0 → KL(p ‖ q) (forward), β = 1 → KL(q ‖ p)
    (reverse). Near the endpoints JSD_β ≈ β·KL(p‖q) (β→0) and (1−β)·KL(q‖p) (β→1), so the value
    jumps by ~1/β at β = 0 and 1/(1−β) at β = 1 (kept for parity with TRL). Temperature divides
    both logits; no T² factor (TRL).
    """
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return kl_from_log_probs(log_p, log_q)
    if beta == 1.0:
        return kl_from_log_probs(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * kl_from_log_probs(log_p, log_m) + (1 - beta) * kl_from_log_probs(log_q, log_m)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew forward KL: `KL(p ‖ α·p + (1−α)·q)` (α of the TEACHER in the mixture);
    the gradient reaches q inside the mixture. α = 0 is KL(p ‖ q)."""
    log_p = log_probs(teacher_logits)
    return kl_from_log_probs(log_p, _log_mix(log_p, log_probs(student_logits), alpha))


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL: `KL(q ‖ α·q + (1−α)·p)` (α of the STUDENT in the mixture).
    α = 0 is KL(q ‖ p)."""
    log_q = log_probs(student_logits)
    return kl_from_log_probs(log_q, _log_mix(log_q, log_probs(teacher_logits), alpha))


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`TVD(p, q) = ½ Σ_v |p − q|` (DistiLLM `tv_distance`), symmetric, in [0, 1]."""
    p = log_probs(teacher_logits).exp()
    q = log_probs(student_logits).exp()
    return 0.5 * (p - q).abs().sum(-1)


# ----------------------------------------------------------------------------- top-k (sparse)
def pack_topk(teacher_logits: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """The packed top-k teacher row per position, `[..., 2k]`: `[..., :k]` the teacher's k
    largest LOG-PROBABILITIES `log_softmax(z_T)` (T = 1), descending, and `[..., k:]` their
    vocabulary indices as floats (exact for V < 2^24 in float32).

    Log-probabilities, not raw logits: they are the same logits up to the per-position shift
    `logsumexp(z_T)`, and only with that shift removed does `1 − Σ exp(values)` give the mass
    the teacher puts OUTSIDE its top k — the tail bucket of `topk_kl`. Raw top-k logits lose it.

    The output store holds this form (float32, the default dtype). `2k == V` is refused: such a
    row has the shape of dense logits, and the objectives tell the two apart by the last
    dimension (== V: dense logits; otherwise packed).
    """
    V = teacher_logits.shape[-1]
    k = int(k)
    if not 1 <= k <= V:
        raise ValueError(f"top-k needs 1 <= k <= V = {V}, got k = {k}")
    if dtype == torch.float32 and V >= _MAX_PACKED_VOCAB:
        raise ValueError(f"vocabulary indices up to {V} are not exact in float32 (V < 2^24)")
    if 2 * k == V:
        raise ValueError(f"k = {k} = V/2 packs to [..., {2 * k}], the shape of dense logits; "
                         "store the dense logits or pick another k")
    return _pack(log_probs(teacher_logits), k).to(dtype)


def _pack(log_p: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = log_p.topk(k, dim=-1)  # sorted: descending
    return torch.cat([values, indices.to(values.dtype)], dim=-1)


def unpack_topk(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log-probabilities [..., k], int64 indices [..., k])` of a packed `[..., 2k]` row."""
    if packed.shape[-1] % 2:
        raise ValueError(f"a packed top-k row has an even last dimension 2k, got {packed.shape[-1]}")
    k = packed.shape[-1] // 2
    return as_float(packed[..., :k]), packed[..., k:].round().long()


def topk_kl(student_logits: torch.Tensor, packed: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Top-k KD as DistillKit's `sparse_kl_div` with `SYMMETRIC_UNIFORM` missing mass: the exact
    KL between the (k+1)-bin collapsed distributions

        P = (p_1 … p_k, 1 − Σ_i p_i),   Q = (q_1 … q_k, 1 − Σ_i q_i)

    over the teacher's top-k tokens v_1 … v_k plus ONE bucket for every other token. The student
    side uses its FULL-vocabulary normaliser, `log q_i = z_S[v_i]/T − logsumexp(z_S/T)`, and its
    bucket is the log-sum-exp of its other V − k log-probabilities (no `1 − Σ` cancellation).
    With every token listed (k = V) there is no bucket and this is KL(p ‖ q) exactly.

    Temperature (DistillKit `get_target_logprobs`, generation temperature 1): the stored
    probabilities become `p_i^(1/T)` and the bucket `(1 − Σ p)^(1/T)`, renormalised over the
    k + 1 bins — exact tempering when k = V, DistillKit's approximation of the bucket otherwise.
    `packed`: `pack_topk`'s `[..., 2k]` rows (log-probabilities + indices). No T² here.
    """
    log_p_k, idx = unpack_topk(packed)
    k, V = idx.shape[-1], student_logits.shape[-1]
    log_q_all = log_probs(student_logits, temperature)
    log_q_k = log_q_all.gather(-1, idx)
    a = 1.0 / temperature
    if k >= V:  # every token listed: the bucket is empty
        log_p = a * log_p_k - torch.logsumexp(a * log_p_k, dim=-1, keepdim=True)
        return kl_from_log_probs(log_p, log_q_k)
    # teacher's bucket 1 − Σ p_i, via expm1 (precise when the top k hold nearly all the mass)
    tail = -torch.expm1(torch.logsumexp(log_p_k, dim=-1).clamp(max=0.0))
    log_p = torch.cat([a * log_p_k, a * tail.log().unsqueeze(-1)], dim=-1)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    log_q_tail = torch.logsumexp(log_q_all.scatter(-1, idx, float("-inf")), dim=-1)
    return kl_from_log_probs(log_p, torch.cat([log_q_k, log_q_tail.unsqueeze(-1)], dim=-1))


def topk_kl_live(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """`topk_kl` from live `[..., V]` teacher logits: packed on the fly (in the computation's
    dtype), so a live teacher and a stored one give the same values."""
    return topk_kl(student_logits, _pack(log_probs(teacher_logits), int(k)), temperature)


# ----------------------------------------------------------------------------- token reduction
def counted(targets: torch.Tensor) -> torch.Tensor:
    """The positions that count, `targets != IGNORE_INDEX` (bool, the shape of targets)."""
    return targets != IGNORE_INDEX


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`Σ_counted values / #counted` — the per-token mean over the batch's counted positions.

    Padding is selected away (`where`, not a product: a NaN there cannot leak). A batch with no
    counted position gives 0 with a gradient path (TRL's `clamp_min(1)`), not 0/0.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mask, values, zero).sum() / mask.sum().clamp_min(1)


def token_nll(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL `−log q(y)`; at IGNORE_INDEX positions the value is that of
    token 0, a placeholder for `token_mean` to drop."""
    y = torch.where(counted(targets), targets, torch.zeros_like(targets))
    return -log_probs(student_logits).gather(-1, y.unsqueeze(-1)).squeeze(-1)
