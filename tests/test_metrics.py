"""ClassificationMeter vs hand-built cases and NumPy references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill_cli.evaluation.metrics import ClassificationMeter


def np_ece(probs, y, bins=15):
    """Guo et al. 2017: equal-width bins (lo, hi] of the max probability."""
    conf, pred = probs.max(1), probs.argmax(1)
    acc = (pred == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(acc[m].mean() - conf[m].mean())
    return ece


def np_nll(logits, y):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_acc1_acc5_hand_built():
    C = 7
    logits = torch.tensor([
        [9., 8, 7, 6, 5, 4, 3],  # y=0: top-1 hit
        [9., 8, 7, 6, 5, 4, 3],  # y=4: 5th -> top-5 hit only
        [9., 8, 7, 6, 5, 4, 3],  # y=5: 6th -> miss
        [0., 0, 0, 0, 0, 0, 1],  # y=6: top-1 hit
    ])
    y = torch.tensor([0, 4, 5, 6])
    m = ClassificationMeter(C, "cpu")
    m.update(logits, y)
    r = m.compute()
    assert r["acc1"] == pytest.approx(50.0)
    assert r["acc5"] == pytest.approx(75.0)
    assert r["n"] == 4 and isinstance(r["n"], int)
    assert all(isinstance(r[k], float) for k in ("acc1", "acc5", "nll", "ece"))
    assert "agreement" not in r


def test_acc5_with_fewer_than_five_classes_is_top_c():
    m = ClassificationMeter(3, "cpu")
    m.update(torch.tensor([[3., 2, 1], [3., 2, 1]]), torch.tensor([2, 1]))
    r = m.compute()
    assert r["acc1"] == 0.0 and r["acc5"] == 100.0


def test_nll_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)) * 3
    y = rng.integers(0, 10, size=50)
    m = ClassificationMeter(10, "cpu")
    m.update(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    assert m.compute()["nll"] == pytest.approx(np_nll(logits, y), rel=1e-5)


def test_ece_matches_numpy_on_random_probabilities():
    rng = np.random.default_rng(1)
    N, C = 2000, 10
    probs = rng.dirichlet(np.full(C, 0.3), size=N)
    y = rng.integers(0, C, size=N)
    # make it informative: half of the labels follow the prediction
    follow = rng.random(N) < 0.5
    y[follow] = probs.argmax(1)[follow]
    m = ClassificationMeter(C, "cpu")
    m.update(torch.tensor(np.log(probs)), torch.tensor(y))  # softmax(log p) = p
    ref = np_ece(probs, y)
    assert ref > 0.01
    assert m.compute()["ece"] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert m.compute()["acc1"] == pytest.approx(100 * np.mean(probs.argmax(1) == y))


def test_ece_is_zero_when_perfectly_calibrated():
    # 10 samples at confidence 0.7 (7 right), 10 at 0.9 (9 right), 4 at 0.5+ (2 of 4 right)
    rows, ys = [], []
    for conf, n_right, n in [(0.7, 7, 10), (0.9, 9, 10), (0.55, 11, 20)]:
        for i in range(n):
            rows.append([conf, 1 - conf])
            ys.append(0 if i < n_right else 1)
    logits = torch.log(torch.tensor(rows, dtype=torch.float64))
    m = ClassificationMeter(2, "cpu")
    m.update(logits, torch.tensor(ys))
    r = m.compute()
    assert r["ece"] == pytest.approx(0.0, abs=1e-12)
    # and a miscalibrated one: all at confidence 0.9, half right -> ECE 0.4
    m2 = ClassificationMeter(2, "cpu")
    m2.update(torch.log(torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)), torch.tensor([0, 1] * 5))
    assert m2.compute()["ece"] == pytest.approx(0.4, abs=1e-12)


def test_bin_edges_are_right_closed():
    # confidence exactly 1.0 lands in the last bin (bins are (lo, hi])
    m = ClassificationMeter(2, "cpu", ece_bins=15)
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    m.update(torch.log(p), torch.tensor([0]))
    assert m.compute()["ece"] == pytest.approx(0.0, abs=1e-12)
    assert int(m._bin_count[-1]) == 1


def test_agreement():
    C = 4
    logits = torch.tensor([[1., 0, 0, 0], [0., 1, 0, 0], [0., 0, 1, 0], [0., 0, 0, 1]])
    teacher = torch.tensor([[5., 0, 0, 0], [0., 5, 0, 0], [5., 0, 0, 0], [0., 5, 0, 0]])
    y = torch.tensor([0, 0, 0, 0])
    m = ClassificationMeter(C, "cpu")
    m.update(logits, y, teacher_logits=teacher)
    r = m.compute()
    assert r["agreement"] == pytest.approx(50.0)
    assert r["acc1"] == pytest.approx(25.0)
    # batches without teacher logits do not count towards agreement
    m.update(logits, y)
    r = m.compute()
    assert r["agreement"] == pytest.approx(50.0) and r["n"] == 8


def test_accumulating_batches_equals_one_big_batch():
    rng = np.random.default_rng(2)
    C = 12
    chunks = [(rng.normal(size=(b, C)) * 2, rng.normal(size=(b, C)) * 2, rng.integers(0, C, size=b))
              for b in (7, 1, 30, 13)]
    many = ClassificationMeter(C, torch.device("cpu"))
    for s, t, y in chunks:
        many.update(torch.tensor(s, dtype=torch.float32), torch.tensor(y), torch.tensor(t, dtype=torch.float32))
    one = ClassificationMeter(C, "cpu")
    cat = lambda i: np.concatenate([c[i] for c in chunks])  # noqa: E731
    one.update(torch.tensor(cat(0), dtype=torch.float32), torch.tensor(cat(2)),
               torch.tensor(cat(1), dtype=torch.float32))
    a, b = many.compute(), one.compute()
    assert a.keys() == b.keys() and a["n"] == b["n"] == 51
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
    assert a["nll"] == pytest.approx(np_nll(cat(0), cat(2)), rel=1e-5)


def test_update_never_syncs_to_host(monkeypatch):
    m = ClassificationMeter(5, "cpu")

    def boom(*a, **k):
        raise AssertionError("host sync in update")
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    m.update(logits, y, teacher_logits=torch.randn(8, 5))
    monkeypatch.undo()
    assert m.compute()["n"] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_has_no_synchronisation():
    m = ClassificationMeter(10, "cuda")
    logits, y, t = (torch.randn(64, 10, device="cuda"), torch.randint(0, 10, (64,), device="cuda"),
                    torch.randn(64, 10, device="cuda"))
    m.update(logits, y, t)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m.update(logits, y, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    r = m.compute()
    assert r["n"] == 128


def test_empty_and_reset():
    m = ClassificationMeter(3, "cpu")
    r = m.compute()
    assert r["n"] == 0 and math.isnan(r["acc1"]) and math.isnan(r["ece"])
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    m.reset()
    assert m.compute()["n"] == 0


def test_shape_errors():
    m = ClassificationMeter(3, "cpu")
    with pytest.raises(ValueError):
        m.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
