"""Membership inference: the rank AUC and the advantage against sklearn / brute force, and the
attack on a tiny model that memorised 32 random-label samples vs the same model untrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from distill_cli.data.bundle import InMemorySplit
from distill_cli.evaluation.privacy import (loss_threshold_advantage, loss_threshold_auc, membership_auc,
                                 per_sample_losses)

NC, L = 10, 16


def sk_auc(m, n):
    m, n = np.asarray(m, float), np.asarray(n, float)
    return roc_auc_score(np.r_[np.ones(len(m)), np.zeros(len(n))], -np.r_[m, n])


def brute_auc(m, n):
    m, n = np.asarray(m, float)[:, None], np.asarray(n, float)[None, :]
    return float(((m < n) + 0.5 * (m == n)).mean())


def test_identical_distributions_near_half():
    rng = np.random.default_rng(0)
    auc = loss_threshold_auc(rng.exponential(size=5000), rng.exponential(size=5000))
    assert abs(auc - 0.5) < 0.02


def test_perfect_separation_and_reverse():
    assert loss_threshold_auc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert loss_threshold_auc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert loss_threshold_advantage([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert loss_threshold_advantage([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.normal(0.0, 1.0, 300 + seed), rng.normal(0.4, 1.3, 200)
    assert loss_threshold_auc(torch.tensor(m), n) == pytest.approx(sk_auc(m, n), abs=1e-12)


def test_ties_count_half():
    assert loss_threshold_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert loss_threshold_auc([0.0, 1.0], [1.0, 2.0]) == pytest.approx(3.5 / 4)
    rng = np.random.default_rng(7)
    m, n = rng.integers(0, 5, 200).astype(float), rng.integers(1, 6, 150).astype(float)  # many ties
    got = loss_threshold_auc(m, n)
    assert got == pytest.approx(sk_auc(m, n), abs=1e-12)
    assert got == pytest.approx(brute_auc(m, n), abs=1e-12)


def test_advantage_is_max_tpr_minus_fpr():
    rng = np.random.default_rng(3)
    for _ in range(3):
        m, n = rng.normal(0, 1, 120).round(1), rng.normal(0.7, 1, 90).round(1)
        fpr, tpr, _ = roc_curve(np.r_[np.ones(len(m)), np.zeros(len(n))], -np.r_[m, n])
        assert loss_threshold_advantage(m, n) == pytest.approx(float(np.max(tpr - fpr)),
                                                               abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError):
        loss_threshold_auc([], [1.0])
    with pytest.raises(ValueError):
        loss_threshold_auc([float("nan")], [1.0])


# ------------------------------------------------------------------------------ on a model
def split(n: int, seed: int) -> InMemorySplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, L, generator=g)
    y = torch.randint(0, NC, (n,), generator=g)  # random labels: only memorisation fits them
    return InMemorySplit(x, y, mean=[0.0], std=[1.0])


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(L, 64), nn.ReLU(), nn.Linear(64, NC))


def overfit(model: nn.Module, data: InMemorySplit, steps: int = 300) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (batch,) = list(data.eval_batches(len(data)))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch.x), batch.y).backward()
        opt.step()
    return model


def test_overfit_model_leaks_membership():
    members, nonmembers = split(32, 1), split(32, 2)
    model = overfit(tiny_model(), members)
    model.train()
    out = membership_auc(model, members, nonmembers, batch_size=8)
    assert model.training  # mode restored
    assert out["mia/n"] == 32
    assert out["mia/auc"] > 0.9 and out["mia/advantage"] > 0.7
    assert out["mia/member_loss"] < 0.1 < out["mia/nonmember_loss"]
    assert set(out) == {"mia/auc", "mia/advantage", "mia/n", "mia/member_loss",
                        "mia/nonmember_loss"}


def test_untrained_model_near_half():
    out = membership_auc(tiny_model(1), split(512, 3), split(512, 4), batch_size=128)
    assert abs(out["mia/auc"] - 0.5) < 0.1  # null sd ≈ 0.018 at 512 per side
    assert out["mia/advantage"] < 0.2


def test_equal_sizes_subsampling_is_deterministic():
    members, nonmembers = split(40, 5), split(100, 6)
    model = tiny_model(2)
    a = membership_auc(model, members, nonmembers, batch_size=16)
    b = membership_auc(model, members, nonmembers, batch_size=7)  # batching does not matter
    assert a["mia/n"] == 40 and a == pytest.approx(b, abs=1e-6)  # float32 sums
    c = membership_auc(model, members, nonmembers, batch_size=16, max_samples=10)
    assert c["mia/n"] == 10
    assert c == membership_auc(model, members, nonmembers, batch_size=16, max_samples=10)
    assert c != membership_auc(model, members, nonmembers, batch_size=16, max_samples=10, seed=1)
    with pytest.raises(ValueError):
        membership_auc(model, members, nonmembers, batch_size=16, max_samples=0)


def test_per_sample_losses_are_cross_entropy_in_split_order():
    data = split(20, 8)
    model = tiny_model(3)
    (batch,) = list(data.eval_batches(20))
    want = nn.functional.cross_entropy(model(batch.x), batch.y, reduction="none").detach()
    got = per_sample_losses(model, data, batch_size=6)
    assert got.dtype == torch.float64 and torch.allclose(got, want.double(), atol=1e-6)
    sel = torch.zeros(20, dtype=torch.bool)
    sel[[1, 7, 19]] = True
    assert torch.allclose(per_sample_losses(model, data, 6, sel), want.double()[sel], atol=1e-6)
