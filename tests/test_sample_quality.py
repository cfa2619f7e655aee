"""evaluation/sample_quality.py against independent float64 references (numpy / scipy formulas
written here, never the code under test): Fréchet distance (scipy sqrtm, the diagonal closed form),
KID (the unbiased polynomial-kernel MMD²), Kynkäänniemi precision/recall (a full distance matrix,
known geometries), class coverage and accuracy."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from distill_cli.errors import UserError
from distill_cli.evaluation import sample_quality as sq


def _gauss(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


def _fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # unbiased, as the metric
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def _exact_moments(n, mean, var, seed):
    """n rows whose SAMPLE mean is exactly `mean` and unbiased sample covariance exactly
    diag(var): whitened Gaussian noise, then scaled — so the closed form applies without noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    cov = z.T @ z / (n - 1)
    z = z @ np.linalg.inv(np.linalg.cholesky(cov)).T  # now z.T z / (n-1) = I
    return z * np.sqrt(var) + mean


# --- Fréchet distance --------------------------------------------------------------------------

def test_frechet_matches_scipy_sqrtm_reference():
    real = _gauss(600, 12, seed=1)
    fake = _gauss(500, 12, seed=2, scale=1.7, shift=0.3)
    want = _fd_reference(real.numpy(), fake.numpy())
    got = sq.frechet_distance(real, fake)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    # float32 inputs are promoted to float64 before any statistic
    want32 = _fd_reference(real.float().double().numpy(), fake.float().double().numpy())
    assert sq.frechet_distance(real.float(), fake.float()) == pytest.approx(want32, rel=1e-9)


def test_frechet_of_a_set_with_itself_is_zero():
    x = _gauss(300, 10, seed=3, scale=4.0, shift=2.0)
    assert abs(sq.frechet_distance(x, x)) < 1e-9


def test_frechet_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    real = torch.from_numpy(_exact_moments(400, mu1, v1, seed=4))
    fake = torch.from_numpy(_exact_moments(300, mu2, v2, seed=5))
    want = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2.0 * np.sqrt(v1 * v2)).sum()
    assert sq.frechet_distance(real, fake) == pytest.approx(want, rel=1e-9)


def test_frechet_survives_a_large_common_offset():
    # features with a big offset and a small spread: sum(x xᵀ) - N μ μᵀ would cancel every digit
    # in float64; FD is translation invariant, so the value must not move
    real, fake = _gauss(400, 6, seed=6, scale=1e-3), _gauss(400, 6, seed=7, scale=2e-3, shift=1e-3)
    base = sq.frechet_distance(real, fake)
    assert sq.frechet_distance(real + 1e6, fake + 1e6) == pytest.approx(base, rel=1e-6)


def test_frechet_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    real, fake = _gauss(600, 32, seed=8), _gauss(600, 32, seed=9, scale=1.3)
    assert sq.frechet_distance(real.cuda(), fake.cuda().float()) == pytest.approx(
        sq.frechet_distance(real, fake.float()), rel=1e-8)
    assert sq.kernel_distance(real.cuda(), fake.cuda(), subsets=3, subset_size=200) == \
        pytest.approx(sq.kernel_distance(real, fake, subsets=3, subset_size=200), rel=1e-8)
    assert sq.precision_recall(real.cuda(), fake.cuda()) == sq.precision_recall(real, fake)


def test_per_class_frechet_is_the_fd_of_each_class_and_skips_thin_classes():
    real, fake = _gauss(90, 5, seed=10), _gauss(61, 5, seed=11, shift=1.0)
    real_y = torch.arange(90) % 3
    fake_y = torch.cat([torch.arange(60) % 2, torch.tensor([2])])  # class 2: one fake row only
    got = sq.per_class_frechet(real, real_y, fake, fake_y, num_classes=3)
    assert sorted(got) == [0, 1]
    for c in (0, 1):
        want = _fd_reference(real[real_y == c].numpy(), fake[fake_y == c].numpy())
        assert got[c] == pytest.approx(want, rel=1e-9)


# --- KID ---------------------------------------------------------------------------------------

def _mmd2_reference(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: kk.sum() - np.trace(kk)
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def test_kid_full_sets_equals_unbiased_poly_mmd_reference():
    real, fake = _gauss(150, 8, seed=12), _gauss(150, 8, seed=13, scale=1.5, shift=0.2)
    want = _mmd2_reference(real.numpy(), fake.numpy())
    # subsets covering every row: the permutation only reorders, so each subset is the full MMD²
    mean, std = sq.kernel_distance(real, fake, subsets=4, subset_size=1000)
    assert mean == pytest.approx(want, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert want > 0.01


def test_kid_subsets_are_seeded_and_leave_the_global_rng_alone():
    real, fake = _gauss(300, 8, seed=14), _gauss(300, 8, seed=15, shift=0.5)
    state = torch.get_rng_state()
    a = sq.kernel_distance(real, fake, subsets=5, subset_size=50, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert sq.kernel_distance(real, fake, subsets=5, subset_size=50, seed=0) == a
    b = sq.kernel_distance(real, fake, subsets=5, subset_size=50, seed=1)
    assert b != a and a[1] > 0
    # each subset is the reference MMD² of the rows it drew: recompute subset 0 independently
    gen = torch.Generator().manual_seed(0)
    ir, jf = torch.randperm(300, generator=gen)[:50], torch.randperm(300, generator=gen)[:50]
    one = sq.kernel_distance(real, fake, subsets=1, subset_size=50, seed=0)[0]
    assert one == pytest.approx(_mmd2_reference(real[ir].numpy(), fake[jf].numpy()), rel=1e-9)


def test_kid_same_distribution_is_near_zero_and_far_is_large():
    g = torch.Generator().manual_seed(16)
    real, same, far = (torch.randn(400, 8, generator=g, dtype=torch.float64) + s for s in (0, 0, 1))
    near = sq.kernel_distance(real, same, subsets=5, subset_size=200)[0]
    assert abs(near) < 0.02 < sq.kernel_distance(real, far, subsets=5, subset_size=200)[0]


# --- precision / recall ------------------------------------------------------------------------

def _pr_reference(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_rad = np.sort(dist(real, real), axis=1)[:, k]  # index 0 is the point itself
    f_rad = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= r_rad[None, :]).any(1).mean()
    recall = (dist(real, fake) <= f_rad[None, :]).any(1).mean()
    return float(precision), float(recall)


def _mog(n, modes, seed):
    g = torch.Generator().manual_seed(seed)
    modes = torch.as_tensor(modes, dtype=torch.float64)
    return modes[torch.arange(n) % len(modes)] + torch.randn(n, modes.shape[1], generator=g,
                                                             dtype=torch.float64)


MODES = [[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]]


def test_precision_recall_matches_full_matrix_reference_and_chunking(monkeypatch):
    real, fake = _gauss(160, 6, seed=19), _gauss(140, 6, seed=20, scale=1.4, shift=0.4)
    want = _pr_reference(real.numpy(), fake.numpy(), k=3)
    assert 0.1 < want[0] < 0.95 and 0.1 < want[1] < 0.95  # a case where the balls matter
    assert sq.precision_recall(real, fake, k=3) == pytest.approx(want, abs=1e-12)
    # 7-row distance chunks (a 160-row set needs 23 of them): same answer
    monkeypatch.setattr(sq, "_CHUNK_BYTES", 8 * 7 * 160)
    assert sq.precision_recall(real, fake, k=3) == pytest.approx(want, abs=1e-12)
    assert sq.precision_recall(real, fake, k=5) == pytest.approx(
        _pr_reference(real.numpy(), fake.numpy(), k=5), abs=1e-12)


def test_precision_recall_identical_and_disjoint_sets():
    x = _mog(400, MODES, seed=21)
    assert sq.precision_recall(x, x) == (1.0, 1.0)
    assert sq.precision_recall(x, x + 1e4) == (0.0, 0.0)


def test_recall_detects_a_generator_that_covers_half_the_modes():
    real = _mog(1000, MODES, seed=22)
    full = sq.precision_recall(real, _mog(1000, MODES, seed=23))
    half = sq.precision_recall(real, _mog(1000, MODES[:2], seed=24))
    assert full[0] > 0.95 and full[1] > 0.95
    assert half[0] > 0.95  # every sample it makes is realistic ...
    assert 0.45 <= half[1] <= 0.5  # ... but half the real data is never produced


# --- class coverage and accuracy ---------------------------------------------------------------

def test_class_entropy_uniform_one_class_and_half():
    ids = torch.arange(100) % 10
    assert sq.class_entropy(torch.nn.functional.one_hot(ids, 10).float(), 10) == pytest.approx(1.0)
    assert sq.class_entropy(ids, 10) == pytest.approx(1.0)
    assert sq.class_entropy(torch.full((50,), 3), 10) == 0.0
    logits = torch.zeros(40, 4)
    logits[:20, 1] = 5.0
    logits[20:, 2] = 5.0  # two of four classes, equally often: log 2 / log 4
    assert sq.class_entropy(logits, 4) == pytest.approx(0.5)
    p = np.array([0.5, 0.25, 0.25])  # skewed: H(p) / log 3
    ids3 = torch.tensor([0, 0, 1, 2])
    assert sq.class_entropy(ids3, 3) == pytest.approx(-(p * np.log(p)).sum() / np.log(3))


def test_class_accuracy_percent():
    logits = torch.eye(4)[torch.tensor([0, 1, 2, 3, 0, 0, 0, 0])]
    labels = torch.tensor([0, 1, 2, 3, 1, 1, 1, 0])
    assert sq.class_accuracy(logits, labels) == pytest.approx(62.5)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: sq.frechet_distance(torch.randn(10, 4), torch.randn(10, 5)), "differ in width"),
    (lambda: sq.frechet_distance(torch.randn(1, 4), torch.randn(10, 4)), "at least 2"),
    (lambda: sq.frechet_distance(torch.randn(10), torch.randn(10, 4)), r"\[N, D\]"),
    (lambda: sq.frechet_distance(torch.randn(10, 4), torch.full((10, 4), float("nan"))), "NaN"),
    (lambda: sq.kernel_distance(torch.randn(10, 4), torch.randn(10, 4), subsets=0), "subsets"),
    (lambda: sq.precision_recall(torch.randn(3, 4), torch.randn(10, 4), k=3), "at least 4"),
    (lambda: sq.class_entropy(torch.randn(10, 3), 4), "columns"),
    (lambda: sq.class_entropy(torch.tensor([0, 5]), 4), r"\[0, 4\)"),
    (lambda: sq.class_entropy(torch.tensor([0, 0]), 1), "num_classes >= 2"),
    (lambda: sq.class_accuracy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "labels"),
])
def test_contract_violations_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_torchmetrics_is_a_user_error(monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as on an install without the extra
    monkeypatch.setitem(sys.modules, "torchmetrics.image", None)
    with pytest.raises(UserError) as err:
        sq.frechet_distance(torch.randn(10, 3), torch.randn(10, 3))
    assert err.value.key == "task" and ".[diffusion]" in err.value.fix
