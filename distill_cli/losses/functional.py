"""Shared pieces of the logit-family objectives (PLD, TAID, DIST, SSLD, MIX-KD): one home for
each formula and each shape check. Pure functions, per-sample results ([B]) unless stated.

The float upcast lives in `ce._as_float` and Hinton's `KL(p_t^T ‖ p_s^T)` in `kd.kd_kl`; they
are re-used from there, not copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.losses.ce import _as_float

__all__ = ["as_float", "check_pair", "check_labels", "label_distribution", "soft_cross_entropy",
           "kl_from_log_probs", "pearson"]

as_float = _as_float  # half/bfloat16 → float32; float32/float64 kept


def check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
    """Shape checks for an objective that needs the teacher (no value checks: no device sync)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if teacher_logits is None:
        raise ValueError("this objective needs teacher logits, got None")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape [B, C]")


def check_labels(student_logits: torch.Tensor, targets: torch.Tensor | None) -> None:
    """Labels: int64 class indices `[B]`, or `[B, C]` float label distributions (mixup/CutMix
    batches; only objectives with `accepts_soft_targets` get those)."""
    if targets is None:
        raise ValueError("this objective needs class labels, got targets=None")
    if targets.shape == student_logits.shape and targets.is_floating_point():
        return
    if targets.shape != student_logits.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be [B] = [{student_logits.shape[0]}] integer class "
                         f"indices, got shape {tuple(targets.shape)} dtype {targets.dtype}")


def label_distribution(targets: torch.Tensor, batch: int, num_classes: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """`[B]` int labels → one-hot; `[B, C]` float label distributions (mixup) → as given
    (detached)."""
    if targets is None:
        raise ValueError("this objective needs targets: [B] class indices or [B, C] label "
                         "distributions")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.shape[0] == batch:
        return F.one_hot(targets, num_classes).to(dtype)
    if targets.dim() == 2 and targets.is_floating_point() and targets.shape == (batch, num_classes):
        return as_float(targets).detach().to(dtype)
    raise ValueError(f"targets must be [B] = [{batch}] integer class indices or [B, C] = "
                     f"[{batch}, {num_classes}] float label distributions, got shape "
                     f"{tuple(targets.shape)} dtype {targets.dtype}")


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample `−Σ_c p_c · log_softmax(z)_c` ([B]); `p` is used as given (no detach here)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample `KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)` ([B]) from log-probabilities; the
    gradient flows into whichever side requires it (both, if both do)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of `[N, D]` tensors ([N]), as the DIST code computes it:
    the cosine of the mean-centred rows, `⟨a', b'⟩ / (‖a'‖·‖b'‖ + eps)`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
