"""Objectives vs independent float64 NumPy re-implementations of METHODS.md's formulas."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.losses import DKD, KD, CrossEntropy, Objective, StepContext
from distill_cli.losses.dkd import dkd_terms
from distill_cli.losses.kd import kd_kl

CONF = Path(CONF_DIR) / "loss"


# ---------------------------------------------------------------- NumPy references (float64)
def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p, q):
    """Σ_c p_c (log p_c − log q_c) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def np_ce(s, y, eps=0.0):
    logp = np.log(np_softmax(s))
    nll = -logp[np.arange(len(y)), y]
    return float(((1 - eps) * nll + eps * (-logp.mean(axis=1))).mean())


def np_kd(s, t, y, T, ce_w, kd_w):
    kd = T**2 * np_kl(np_softmax(t / T), np_softmax(s / T)).mean()
    ce = np_ce(s, y)
    return ce_w * ce + kd_w * kd, ce, kd


def np_dkd_per_sample(s, t, y, T):
    """(TCKD, NCKD, p_t,y) per sample at temperature T, without T²: NCKD over the
    renormalised non-target distributions (the target column deleted)."""
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    idx = np.arange(len(y))
    bs = np.stack([ps[idx, y], 1 - ps[idx, y]], axis=1)
    bt = np.stack([pt[idx, y], 1 - pt[idx, y]], axis=1)
    tckd = np_kl(bt, bs)
    keep = np.ones_like(ps, dtype=bool)
    keep[idx, y] = False
    C = s.shape[1]
    qs = ps[keep].reshape(-1, C - 1)
    qt = pt[keep].reshape(-1, C - 1)
    qs, qt = qs / qs.sum(1, keepdims=True), qt / qt.sum(1, keepdims=True)
    nckd = np_kl(qt, qs)
    return tckd, nckd, pt[idx, y]


def np_dkd(s, t, y, T, alpha, beta, ce_w, w):
    tckd, nckd, _ = np_dkd_per_sample(s, t, y, T)
    tckd, nckd = T**2 * tckd.mean(), T**2 * nckd.mean()
    ce = np_ce(s, y)
    return ce_w * ce + w * (alpha * tckd + beta * nckd), ce, tckd, nckd


def batch(B=16, C=10, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, C)) * scale
    t = rng.normal(size=(B, C)) * scale
    y = rng.integers(0, C, size=B)
    return s, t, y


def tt(a, grad=False):
    x = torch.tensor(a, dtype=torch.float64 if np.asarray(a).dtype.kind == "f" else torch.long)
    return x.requires_grad_(grad) if grad else x


def ctx(epoch):
    return StepContext(epoch=epoch, step=(epoch - 1) * 10, steps_per_epoch=10, total_steps=2400)


# ---------------------------------------------------------------- contract
def test_contract_and_terms():
    s, t, y = batch()
    assert CrossEntropy.needs_teacher is False and KD.needs_teacher and DKD.needs_teacher
    for obj, keys in [(CrossEntropy(), {"loss", "ce"}), (KD(), {"loss", "ce", "kd"}),
                      (DKD(), {"loss", "ce", "tckd", "nckd", "warmup_weight"})]:
        assert isinstance(obj, Objective)
        out = obj(tt(s, True), tt(t), tt(y), None)
        assert set(out) == keys
        assert all(v.dim() == 0 for v in out.values())
        assert out["loss"].requires_grad
        assert not any(v.requires_grad for k, v in out.items() if k != "loss")


def test_defaults():
    assert CrossEntropy().label_smoothing == 0.0
    kd = KD()
    assert (kd.temperature, kd.ce_weight, kd.kd_weight) == (4.0, 0.1, 0.9)
    d = DKD()
    assert (d.temperature, d.alpha, d.beta, d.ce_weight, d.warmup) == (4.0, 1.0, 8.0, 1.0, 20)


@pytest.mark.parametrize("name,cls", [("ce", CrossEntropy), ("kd", KD), ("dkd", DKD)])
def test_yaml_matches_class_defaults(name, cls):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    obj = instantiate(cfg)
    assert type(obj) is cls
    opts = OmegaConf.to_container(cfg, resolve=True)
    opts.pop("_target_")
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self"}
    assert opts == params  # every option, with the class default


def test_bad_options_are_user_errors():
    with pytest.raises(UserError):
        KD(temperature=0)
    with pytest.raises(UserError):
        DKD(temperature=-1)
    with pytest.raises(UserError):
        DKD(warmup=-1)
    with pytest.raises(UserError):
        CrossEntropy(label_smoothing=1.5)


# ---------------------------------------------------------------- CE
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_value_and_label_smoothing_match_torch(eps):
    s, _, y = batch(seed=1)
    out = CrossEntropy(label_smoothing=eps)(tt(s), None, tt(y))
    ref = torch.nn.functional.cross_entropy(tt(s), tt(y), label_smoothing=eps)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx(np_ce(s, y, eps), rel=1e-10)
    assert out["ce"].item() == out["loss"].item()


def test_ce_gradient_is_softmax_minus_onehot():
    s, _, y = batch(B=8, C=7, seed=2)
    st = tt(s, True)
    CrossEntropy()(st, None, tt(y))["loss"].backward()
    onehot = np.eye(7)[y]
    np.testing.assert_allclose(st.grad.numpy(), (np_softmax(s) - onehot) / 8, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- KD
@pytest.mark.parametrize("T,cw,kw", [(4.0, 0.1, 0.9), (1.0, 0.5, 0.5), (2.5, 0.3, 2.0)])
def test_kd_value(T, cw, kw):
    s, t, y = batch(seed=3)
    out = KD(temperature=T, ce_weight=cw, kd_weight=kw)(tt(s), tt(t), tt(y))
    loss, ce, kd = np_kd(s, t, y, T, cw, kw)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-10)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)


def test_kd_same_logits_gives_zero_kd():
    s, _, y = batch(seed=4)
    out = KD()(tt(s), tt(s.copy()), tt(y))
    assert abs(out["kd"].item()) < 1e-12
    assert out["loss"].item() == pytest.approx(0.1 * np_ce(s, y), rel=1e-10)


def test_kd_gradient_analytic_and_teacher_gets_none():
    T, cw, kw = 4.0, 0.1, 0.9
    s, t, y = batch(B=6, C=5, seed=5)
    st, tt_ = tt(s, True), tt(t, True)
    KD(T, cw, kw)(st, tt_, tt(y))["loss"].backward()
    assert tt_.grad is None
    B = len(y)
    expected = cw * (np_softmax(s) - np.eye(5)[y]) / B + kw * T * (np_softmax(s / T) - np_softmax(t / T)) / B
    np.testing.assert_allclose(st.grad.numpy(), expected, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------- DKD
def test_dkd_value_no_ctx_is_warmed_up():
    s, t, y = batch(seed=6)
    out = DKD()(tt(s), tt(t), tt(y))
    loss, ce, tckd, nckd = np_dkd(s, t, y, 4.0, 1.0, 8.0, 1.0, w=1.0)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-9)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["warmup_weight"].item() == 1.0
    assert out["loss"].item() == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("epoch,w", [(1, 0.05), (10, 0.5), (20, 1.0), (25, 1.0)])
def test_dkd_warmup(epoch, w):
    s, t, y = batch(seed=7)
    T, a, b, cw = 2.0, 1.5, 6.0, 0.7
    out = DKD(temperature=T, alpha=a, beta=b, ce_weight=cw, warmup=20)(tt(s), tt(t), tt(y), ctx(epoch))
    loss, ce, tckd, nckd = np_dkd(s, t, y, T, a, b, cw, w)
    assert out["warmup_weight"].item() == pytest.approx(w, rel=1e-15)
    # TCKD/NCKD are logged before the warm-up weight
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-9)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-9)


def test_dkd_zero_warmup_means_no_warmup():
    s, t, y = batch(seed=7)
    assert DKD(warmup=0)(tt(s), tt(t), tt(y), ctx(1))["warmup_weight"].item() == 1.0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_kl_decomposes_into_tckd_plus_weighted_nckd(T):
    """METHODS.md identity, per sample: KL = TCKD + (1 − p_t,y)·NCKD (before T², weights)."""
    s, t, y = batch(B=32, C=12, seed=8)
    # NumPy, from the formulas alone
    tckd_np, nckd_np, pty = np_dkd_per_sample(s, t, y, T)
    kl_np = np_kl(np_softmax(t / T), np_softmax(s / T))
    np.testing.assert_allclose(kl_np, tckd_np + (1 - pty) * nckd_np, rtol=1e-10)
    # the torch pieces used by KD and DKD
    tckd, nckd = dkd_terms(tt(s), tt(t), tt(y), T)
    kl = kd_kl(tt(s), tt(t), T)
    np.testing.assert_allclose(tckd.numpy(), tckd_np, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(nckd.numpy(), nckd_np, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(kl.numpy(), (tckd + (1 - torch.tensor(pty)) * nckd).numpy(),
                               rtol=1e-10, atol=1e-14)


def test_dkd_teacher_gets_no_gradient_and_gradcheck():
    s, t, y = batch(B=5, C=6, seed=9)
    st, tt_ = tt(s, True), tt(t, True)
    DKD()(st, tt_, tt(y), ctx(3))["loss"].backward()
    assert tt_.grad is None
    assert torch.isfinite(st.grad).all()
    dkd = DKD(temperature=2.0)
    assert torch.autograd.gradcheck(lambda z: dkd(z, tt(t), tt(y))["loss"], (tt(s, True),))


def test_dkd_extreme_logits_stay_finite():
    """Probabilities that underflow (p_y = 1 in float32) must not give inf/NaN."""
    B, C = 4, 10
    s = torch.zeros(B, C)
    s[:, 0] = 3000.0  # student certain of class 0
    t = torch.zeros(B, C)
    t[:, 1] = 3000.0  # teacher certain of class 1
    y = torch.tensor([0, 1, 0, 1])
    s.requires_grad_(True)
    out = DKD(temperature=1.0)(s, t, y)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()
    out_kd = KD(temperature=1.0)(s.detach(), t, y)
    assert all(torch.isfinite(v) for v in out_kd.values())


def test_batch_of_one():
    s, t, y = batch(B=1, C=10, seed=10)
    assert CrossEntropy()(tt(s), None, tt(y))["loss"].item() == pytest.approx(np_ce(s, y), rel=1e-10)
    assert KD()(tt(s), tt(t), tt(y))["loss"].item() == pytest.approx(np_kd(s, t, y, 4.0, 0.1, 0.9)[0], rel=1e-10)
    assert DKD()(tt(s), tt(t), tt(y), ctx(5))["loss"].item() == pytest.approx(
        np_dkd(s, t, y, 4.0, 1.0, 8.0, 1.0, 0.25)[0], rel=1e-9)


def test_half_precision_logits_are_upcast():
    s, t, y = batch(seed=11)
    out = DKD()(tt(s).bfloat16(), tt(t).bfloat16(), tt(y))
    assert out["loss"].dtype == torch.float32
    ref = DKD()(tt(s).bfloat16().double(), tt(t).bfloat16().double(), tt(y))
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)


def test_shape_errors():
    s, t, y = batch()
    with pytest.raises(ValueError):
        KD()(tt(s), None, tt(y))
    with pytest.raises(ValueError):
        DKD()(tt(s), tt(t)[:, :5], tt(y))
    with pytest.raises(ValueError):
        CrossEntropy()(tt(s), None, tt(y)[:3])
