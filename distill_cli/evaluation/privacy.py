"""Membership inference — to MEASURE how much a trained model leaks about its training set.

The attack is the loss-threshold attack (Yeom et al. 2018): "sample z was a training member iff
the model's cross-entropy on z is below a threshold τ". Over all τ it is summarised by

* `mia/auc`: the ROC AUC of that attack = P(loss_member < loss_nonmember) + ½·P(equal), over all
  member/non-member pairs (Mann–Whitney U / (n_m·n_n), from tie-averaged ranks). 0.5 = no
  leakage, 1.0 = every member has a lower loss than every non-member. (Below 0.5 means members
  look LESS like members; reported as is, not folded.)
* `mia/advantage`: the membership advantage of the best threshold, `max_τ (TPR(τ) − FPR(τ))`
  with TPR = fraction of members with loss ≤ τ, FPR = the same for non-members (Yeom et al.'s
  Adv; = the KS statistic of the two loss samples in the attack's direction). In [0, 1]; τ is
  chosen on the same samples, so it is an optimistic (upper) estimate for that attack.

Members and non-members are equally many (the larger side subsampled, deterministically and at
random — never "the first n", splits can be sorted by class), so 0.5 and 0 are the no-leakage
values.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.seeding import derive_seed


def _as_1d(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values` (ascending), ties sharing the average of their ranks."""
    uniq, inverse, counts = torch.unique(values, sorted=True, return_inverse=True,
                                         return_counts=True)
    end = torch.cumsum(counts, 0).to(torch.float64)       # last rank of each tie group
    avg = end - (counts.to(torch.float64) - 1) / 2         # mean of start..end
    return avg[inverse]


def loss_threshold_auc(member_losses: torch.Tensor | Sequence[float],
                       nonmember_losses: torch.Tensor | Sequence[float]) -> float:
    """ROC AUC of "member iff loss < threshold": P(l_m < l_n) + ½·P(l_m = l_n) over all pairs."""
    m = _as_1d(member_losses, "member_losses")
    n = _as_1d(nonmember_losses, "nonmember_losses")
    # members are the positives and LOWER loss = more member-like: rank the negated losses
    ranks = _average_ranks(torch.cat([-m, -n]))
    n_m, n_n = m.numel(), n.numel()
    u = ranks[:n_m].sum() - n_m * (n_m + 1) / 2
    return float(u / (n_m * n_n))


def loss_threshold_advantage(member_losses: torch.Tensor | Sequence[float],
                             nonmember_losses: torch.Tensor | Sequence[float]) -> float:
    """`max_τ TPR(τ) − FPR(τ)` of "member iff loss ≤ τ" over all thresholds
    (≥ 0: τ = −∞ gives 0)."""
    m = _as_1d(member_losses, "member_losses").sort().values
    n = _as_1d(nonmember_losses, "nonmember_losses").sort().values
    taus = torch.unique(torch.cat([m, n]))
    tpr = torch.searchsorted(m, taus, right=True).to(torch.float64) / m.numel()
    fpr = torch.searchsorted(n, taus, right=True).to(torch.float64) / n.numel()
    return float(max((tpr - fpr).max().item(), 0.0))


def _subset(n_total: int, n: int, seed: int, side: str) -> torch.Tensor:
    """Bool mask `[n_total]` selecting `n` positions: all, or a seeded random subset."""
    mask = torch.zeros(n_total, dtype=torch.bool)
    if n >= n_total:
        mask[:] = True
        return mask
    g = torch.Generator().manual_seed(derive_seed("mia", side, seed, n_total, n))
    mask[torch.randperm(n_total, generator=g)[:n]] = True
    return mask


@torch.no_grad()
def per_sample_losses(model: nn.Module, split, batch_size: int,
                      select: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample CE (float64, CPU) of `model` over `split.eval_batches(batch_size)`, for the
    split positions where `select` (bool `[len(split)]`) is true, in split order. The model is
    run in eval mode (its previous mode restored) and only on the selected rows."""
    device = next((p.device for p in model.parameters()), None)
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in split.eval_batches(batch_size):
            x, y = batch.x, batch.y
            if select is not None:
                keep = select[batch.index.cpu()]
                if not keep.any():
                    continue
                keep = keep.to(x.device)
                x, y = x[keep], y[keep]
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = model(x).float()
            out.append(F.cross_entropy(logits, y, reduction="none").to("cpu", torch.float64))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def membership_auc(model: nn.Module, member_split, nonmember_split, batch_size: int,
                   max_samples: int | None = None, seed: int = 0) -> dict[str, float | int]:
    """Loss-threshold membership inference of `model`: members = `member_split` (typically the
    training split), non-members = `nonmember_split` (held-out data from the same distribution).

    Uses `n = min(len(member), len(nonmember), max_samples)` samples from each side; a side with
    more is subsampled at random with a generator seeded by `derive_seed("mia", side, seed, N, n)`
    (deterministic). Returns `{"mia/auc", "mia/advantage"}` (module docstring) plus `mia/n`
    (samples per side) and the mean losses `mia/member_loss`, `mia/nonmember_loss`.
    """
    n = min(len(member_split), len(nonmember_split))
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
        n = min(n, max_samples)
    if n < 1:
        raise ValueError("membership_auc needs at least one member and one non-member sample")
    lm = per_sample_losses(model, member_split, batch_size,
                           _subset(len(member_split), n, seed, "member"))
    ln = per_sample_losses(model, nonmember_split, batch_size,
                           _subset(len(nonmember_split), n, seed, "nonmember"))
    return {"mia/auc": loss_threshold_auc(lm, ln),
            "mia/advantage": loss_threshold_advantage(lm, ln),
            "mia/n": n,
            "mia/member_loss": float(lm.mean()),
            "mia/nonmember_loss": float(ln.mean())}
