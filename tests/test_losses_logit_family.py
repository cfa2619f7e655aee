"""PLD, TAID, DIST, SSLD, MIX-KD vs independent float64 NumPy / pure-Python re-implementations
of METHODS.md's formulas, plus the identities METHODS.md states for each."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill_cli.config.paths import CONF_DIR
from distill_cli.config.build import build_objective
from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.dist import DIST
from distill_cli.losses.mixkd import MixKD
from distill_cli.losses.pld import PLD, plackett_luce_loss, pld_permutation
from distill_cli.losses.ssld import SSLD
from distill_cli.losses.taid import TAID

CONF = Path(CONF_DIR) / "loss"


# ---------------------------------------------------------------- NumPy references (float64)
def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def np_ce(s, y):
    return float(-np_log_softmax(s)[np.arange(len(y)), y].mean())


def np_lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def np_pld_order(t_row, label):
    others = sorted((c for c in range(len(t_row)) if c != label), key=lambda c: (-t_row[c], c))
    return [label] + others


def np_pld(s, t, y, T):
    """Loops straight from the formula: Σ_k α_k (lse_{l≥k} s_{π_l} − s_{π_k}), mean over B."""
    p_t = np_softmax(t / T)
    total = 0.0
    for i in range(len(y)):
        order = np_pld_order(t[i], y[i])
        for k, c in enumerate(order):
            tail = [s[i, order[l]] for l in range(k, len(order))]
            total += p_t[i, c] * (np_lse(tail) - s[i, c])
    return total / len(y)


def np_taid(s, t, tval):
    p = np_softmax((1 - tval) * s + tval * t)
    return float(-(p * np_log_softmax(s)).sum(axis=1).mean()), p


def np_pearson(a, b, eps=1e-8):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + eps))


def np_dist(s, t, y, T, beta, gamma, ce_w):
    ys, yt = np_softmax(s / T), np_softmax(t / T)
    B, C = ys.shape
    inter = 1 - np.mean([np_pearson(ys[i], yt[i]) for i in range(B)])
    intra = 1 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(C)])
    ce = np_ce(s, y)
    inter, intra = T**2 * inter, T**2 * intra
    return ce_w * ce + beta * inter + gamma * intra, ce, inter, intra


def np_skl(s, t, T=1.0):
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    return float((0.5 * (np_kl(pt, ps) + np_kl(ps, pt))).mean())


def np_mixkd(s, t, y_soft, soft_w, kd_w, eps=1e-7):
    zs = s / (s.std(axis=1, ddof=1, keepdims=True) + eps)
    zt = t / (t.std(axis=1, ddof=1, keepdims=True) + eps)
    soft_ce = float(-(y_soft * np_log_softmax(zs)).sum(axis=1).mean())
    kd = float(np_kl(np_softmax(zt), np_softmax(zs)).mean())
    return soft_w * soft_ce + kd_w * kd, soft_ce, kd


def batch(B=16, C=10, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, C)) * scale, rng.normal(size=(B, C)) * scale,
            rng.integers(0, C, size=B))


def tt(a, grad=False):
    x = torch.tensor(a, dtype=torch.float64 if np.asarray(a).dtype.kind == "f" else torch.long)
    return x.requires_grad_(grad) if grad else x


def ctx(step, total=50, spe=10):
    return StepContext(epoch=step // spe + 1, step=step, steps_per_epoch=spe, total_steps=total)


ALL = [(PLD, {"loss", "pld"}), (TAID, {"loss", "taid", "t", "momentum"}),
       (DIST, {"loss", "ce", "inter", "intra"}), (SSLD, {"loss", "skl"}),
       (MixKD, {"loss", "soft_ce", "kd"})]


# ---------------------------------------------------------------- contract, defaults, configs
@pytest.mark.parametrize("cls,keys", ALL)
def test_contract_and_terms(cls, keys):
    s, t, y = batch()
    obj = cls()
    assert isinstance(obj, Objective) and cls.needs_teacher
    st, tt_ = tt(s, True), tt(t, True)
    out = obj(st, tt_, tt(y), None)
    assert set(out) == keys
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert out["loss"].requires_grad
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert tt_.grad is None and torch.isfinite(st.grad).all()


def test_uses_labels():
    assert SSLD.uses_labels is False and SSLD().uses_labels is False
    assert SSLD(ce_weight=0.5).uses_labels is True
    assert TAID().uses_labels is False and TAID(ce_weight=0.1).uses_labels is True
    assert PLD().uses_labels and DIST().uses_labels and MixKD().uses_labels


def test_defaults():
    assert PLD().temperature == 4.0
    d = TAID()
    assert (d.t_start, d.t_end, d.alpha, d.beta, d.schedule, d.ce_weight) == (
        0.4, 1.0, 5e-4, 0.99, "adaptive", 0.0)
    d = DIST()
    assert (d.temperature, d.beta, d.gamma, d.ce_weight) == (4.0, 2.0, 2.0, 1.0)
    d = SSLD()
    assert (d.temperature, d.ce_weight) == (1.0, 0.0)
    d = MixKD()
    assert (d.soft_weight, d.kd_weight) == (0.1, 0.9)


@pytest.mark.parametrize("name,cls", [("pld", PLD), ("taid", TAID), ("dist", DIST),
                                      ("ssld", SSLD), ("mixkd", MixKD)])
def test_yaml_matches_class_defaults(name, cls, cfg_factory):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    # mixkd.yaml also pulls the authors' partial mixup (a defaults list) and hands the run's
    # `augment.mix` to the loss to check (`mix`, None in direct calls): not loss constants
    for run_key in ("defaults", "mix"):
        if run_key in cfg:
            del cfg[run_key]   # (pop would resolve the interpolation first)
    assert type(instantiate(cfg)) is cls
    opts = OmegaConf.to_container(cfg)
    opts.pop("_target_")
    if name == "mixkd":
        opts["mix"] = None
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self"}
    assert opts == params  # every option, with the class default
    # and through the real config tree + the build allow-list, as a run does
    obj = build_objective(cfg_factory([f"loss={name}"]).loss)
    assert type(obj) is cls


def test_bad_options_are_user_errors():
    bad = [(PLD, {"temperature": 0}, "loss.temperature"),
           (TAID, {"t_start": 1.0}, "loss.t_start"), (TAID, {"t_end": 0.3}, "loss.t_end"),
           (TAID, {"alpha": -1}, "loss.alpha"), (TAID, {"beta": 1.0}, "loss.beta"),
           (TAID, {"schedule": "cosine"}, "loss.schedule"),
           (TAID, {"ce_weight": -1}, "loss.ce_weight"),
           (DIST, {"temperature": -1}, "loss.temperature"), (DIST, {"gamma": -1}, "loss.gamma"),
           (SSLD, {"temperature": 0}, "loss.temperature"),
           (SSLD, {"ce_weight": -0.1}, "loss.ce_weight"),
           (MixKD, {"kd_weight": -1}, "loss.kd_weight")]
    for cls, kw, key in bad:
        with pytest.raises(UserError) as err:
            cls(**kw)
        assert err.value.key == key


@pytest.mark.parametrize("cls", [PLD, TAID, DIST, SSLD, MixKD])
def test_half_precision_logits_are_upcast(cls):
    s, t, y = batch(seed=11)
    out = cls()(tt(s).bfloat16(), tt(t).bfloat16(), tt(y))
    assert out["loss"].dtype == torch.float32
    ref = cls()(tt(s).bfloat16().double(), tt(t).bfloat16().double(), tt(y))
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("cls", [PLD, TAID, DIST, SSLD, MixKD])
def test_shape_errors(cls):
    s, t, y = batch()
    with pytest.raises(ValueError):
        cls()(tt(s), None, tt(y))
    with pytest.raises(ValueError):
        cls()(tt(s), tt(t)[:, :5], tt(y))


@pytest.mark.parametrize("cls", [PLD, TAID, DIST, SSLD, MixKD])
def test_gradcheck(cls):
    s, t, y = batch(B=5, C=6, seed=9)
    obj = cls()
    if cls is TAID:  # for t < 1 the stop-gradient target is a deliberate non-gradient
        obj.t.fill_(1.0)
    assert torch.autograd.gradcheck(lambda z: obj(z, tt(t), tt(y))["loss"], (tt(s, True),))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [PLD, TAID, DIST, SSLD, MixKD])
def test_no_host_device_sync_on_cuda(cls):
    """forward, backward and after_step never force a host-device synchronisation."""
    dev = torch.device("cuda")
    s, t, y = batch(B=64, C=100, seed=23)
    obj = cls().to(dev)
    st = torch.tensor(s, dtype=torch.float32, device=dev, requires_grad=True)
    tl = torch.tensor(t, dtype=torch.bfloat16, device=dev)
    yl = torch.tensor(y, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(3):
            out = obj(st, tl, yl, ctx(k, total=100))
            out["loss"].backward()
            obj.after_step(out, ctx(k, total=100))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


# ---------------------------------------------------------------- PLD
@pytest.mark.parametrize("T", [1.0, 4.0, 0.5])
def test_pld_matches_numpy(T):
    s, t, y = batch(seed=1)
    out = PLD(temperature=T)(tt(s), tt(t), tt(y))
    ref = np_pld(s, t, y, T)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    assert out["pld"].item() == out["loss"].item()


def test_pld_permutation_keeps_label_first_when_teacher_disagrees():
    s, t, y = batch(B=32, C=12, seed=2)
    y = (t.argmax(axis=1) + 1 + np.arange(32) % 11) % 12  # never the teacher's top class
    assert (y != t.argmax(axis=1)).all()
    perm = pld_permutation(tt(t), tt(y)).numpy()
    assert (perm[:, 0] == y).all()
    for i in range(32):
        assert perm[i].tolist() == np_pld_order(t[i], y[i])
        assert sorted(perm[i].tolist()) == list(range(12))  # a permutation
    # and the loss agrees with the loop reference in that regime too
    assert PLD(2.0)(tt(s), tt(t), tt(y))["loss"].item() == pytest.approx(np_pld(s, t, y, 2.0),
                                                                          rel=1e-10)


def test_pld_one_hot_weights_give_ce():
    s, t, y = batch(seed=3)
    perm = pld_permutation(tt(t), tt(y))
    w = torch.zeros(s.shape, dtype=torch.float64)
    w[:, 0] = 1.0
    per_sample = plackett_luce_loss(tt(s), perm, w)
    assert per_sample.mean().item() == pytest.approx(np_ce(s, y), rel=1e-12)
    np.testing.assert_allclose(per_sample.numpy(),
                               F.cross_entropy(tt(s), tt(y), reduction="none").numpy(), rtol=1e-12)


def test_pld_peaked_teacher_on_label_gives_ce():
    s, t, y = batch(seed=4)
    t[np.arange(len(y)), y] += 20.0  # the teacher's top class is the label
    out = PLD(temperature=0.01)(tt(s), tt(t), tt(y))  # α → (1, 0, …, 0)
    assert out["loss"].item() == pytest.approx(np_ce(s, y), rel=1e-10)


def test_pld_shift_invariant():
    s, t, y = batch(seed=5)
    c = np.random.default_rng(0).normal(size=(len(y), 1)) * 50  # a different constant per row
    a = PLD()(tt(s), tt(t), tt(y))["loss"].item()
    assert PLD()(tt(s + c), tt(t), tt(y))["loss"].item() == pytest.approx(a, rel=1e-10)
    assert PLD()(tt(s + 7.0), tt(t), tt(y))["loss"].item() == pytest.approx(a, rel=1e-10)


def test_pld_weights_not_renormalised_and_temperature_only_on_teacher():
    """Changing τ changes only the weights: a student-side T would change the tail lse's."""
    s, t, y = batch(seed=6)
    perm = pld_permutation(tt(t), tt(y))
    for T in (1.0, 3.0):
        w = torch.softmax(tt(t) / T, dim=1).gather(1, perm)
        assert w.sum(dim=1).numpy() == pytest.approx(np.ones(len(y)))
        assert PLD(T)(tt(s), tt(t), tt(y))["loss"].item() == pytest.approx(
            plackett_luce_loss(tt(s), perm, w).mean().item(), rel=1e-14)


def test_pld_needs_labels():
    s, t, _ = batch()
    with pytest.raises(ValueError):
        PLD()(tt(s), tt(t), None)


# ---------------------------------------------------------------- TAID: loss
def test_taid_matches_numpy_at_current_t():
    s, t, y = batch(seed=7)
    obj = TAID()
    out = obj(tt(s), tt(t), tt(y))
    assert out["loss"].item() == pytest.approx(np_taid(s, t, 0.4)[0], rel=1e-12)
    assert out["t"].item() == 0.4 and out["momentum"].item() == 0.0
    obj.t.fill_(0.73)  # without a ctx the CURRENT t is used
    out = obj(tt(s), tt(t), None)
    assert out["loss"].item() == pytest.approx(np_taid(s, t, 0.73)[0], rel=1e-12)
    assert out["t"].item() == pytest.approx(0.73, rel=1e-15)


def test_taid_at_t1_is_soft_label_ce_against_teacher():
    s, t, y = batch(seed=8)
    obj = TAID()
    obj.t.fill_(1.0)
    ref = float(-(np_softmax(t) * np_log_softmax(s)).sum(axis=1).mean())
    assert obj(tt(s), tt(t), tt(y))["loss"].item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("tval", [0.4, 0.8, 1.0])
def test_taid_target_is_detached(tval):
    """d loss / d s = (softmax(s) − p)/B: no gradient flows through the target's s."""
    s, t, y = batch(B=8, C=7, seed=9)
    obj = TAID()
    obj.t.fill_(tval)
    st = tt(s, True)
    obj(st, tt(t), None)["loss"].backward()
    _, p = np_taid(s, t, tval)
    np.testing.assert_allclose(st.grad.numpy(), (np_softmax(s) - p) / 8, rtol=1e-10, atol=1e-14)


def test_taid_ce_weight_and_labels():
    s, t, y = batch(seed=10)
    out = TAID(ce_weight=0.3)(tt(s), tt(t), tt(y))
    assert set(out) == {"loss", "taid", "ce", "t", "momentum"}
    assert out["ce"].item() == pytest.approx(np_ce(s, y), rel=1e-12)
    assert out["loss"].item() == pytest.approx(np_taid(s, t, 0.4)[0] + 0.3 * np_ce(s, y), rel=1e-12)
    with pytest.raises(ValueError):
        TAID(ce_weight=0.3)(tt(s), tt(t), None)


# ---------------------------------------------------------------- TAID: the schedule of t
class RefTAID:
    """Pure-Python re-implementation of METHODS.md's update (the official `update_t`)."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, schedule="adaptive"):
        self.t_start, self.t_end, self.alpha, self.beta, self.schedule = (
            t_start, t_end, alpha, beta, schedule)
        self.t, self.m, self.prev = t_start, 0.0, None

    def step(self, J, step, total):
        if self.prev is None:
            self.prev = J
            return
        delta = (self.prev - J) / (self.prev + 1e-15)
        self.m = self.beta * self.m + (1 - self.beta) * delta
        self.prev = J
        t_lin = self.t_start + (self.t_end - self.t_start) * step / total
        if self.schedule == "linear":
            self.t = min(self.t_end, t_lin)
            return
        a = self.alpha if self.schedule == "adaptive" else min(1.0, self.alpha * 10000 / total)
        push = self.t + a * (1 / (1 + math.exp(-self.m))) * (1 - self.t)
        self.t = min(self.t_end, max(t_lin, push))


def jt(J):
    """The terms after_step reads: J = the `taid` term (float64 so the reference sees J exactly)."""
    return {"taid": torch.tensor(J, dtype=torch.float64)}


def losses(n=50, seed=0):
    """A synthetic, mostly decreasing loss sequence with noise (so δ changes sign sometimes)."""
    rng = np.random.default_rng(seed)
    return [float(2.0 * math.exp(-0.05 * k) + 0.3 + 0.02 * rng.normal()) for k in range(n)]


# (schedule, alpha, t_start, t_end, total_steps, whether the α-push ever beats the ramp):
# ramp-dominated, push-dominated and saturating-at-t_end runs for every schedule
SCHEDULE_CASES = [("adaptive", 5e-4, 0.4, 1.0, 50, False),
                  ("adaptive", 0.05, 0.4, 1.0, 1000, True),
                  ("adaptive", 0.5, 0.2, 0.9, 1000, True),
                  ("linear", 0.05, 0.4, 1.0, 50, False),
                  ("linear", 5e-4, 0.1, 0.8, 40, False),
                  ("scaled", 5e-4, 0.4, 1.0, 50, True),
                  ("scaled", 5e-4, 0.4, 0.95, 2000, True),
                  ("scaled", 0.5, 0.4, 1.0, 30, True)]


@pytest.mark.parametrize("schedule,alpha,t_start,t_end,total,pushed", SCHEDULE_CASES)
def test_taid_t_trace_matches_reference(schedule, alpha, t_start, t_end, total, pushed):
    obj = TAID(t_start=t_start, t_end=t_end, alpha=alpha, schedule=schedule)
    ref = RefTAID(t_start, t_end, alpha, 0.99, schedule)
    above_ramp = 0
    for k, J in enumerate(losses()):
        t_before, m_before = obj.t.item(), obj.momentum.item()
        obj.after_step({"loss": torch.tensor(J, dtype=torch.float32), **jt(J)}, ctx(k, total))
        ref.step(J, k, total)
        if k == 0:  # first call only records J
            assert (obj.t.item(), obj.momentum.item()) == (t_before, m_before)
            assert obj.prev_loss.item() == J and bool(obj.started)
        assert obj.t.item() == pytest.approx(ref.t, rel=1e-12, abs=1e-15)
        assert obj.momentum.item() == pytest.approx(ref.m, rel=1e-10, abs=1e-15)
        t_lin = t_start + (t_end - t_start) * k / total
        assert obj.t.item() <= t_end
        if k > 0:
            assert obj.t.item() >= min(t_lin, t_end) - 1e-15
            above_ramp += obj.t.item() > min(t_lin, t_end) + 1e-12
            if schedule == "linear":
                assert obj.t.item() == pytest.approx(min(t_lin, t_end), rel=1e-15)
        assert obj.t.item() >= t_before  # monotone
    assert (above_ramp > 0) == pushed


def test_taid_schedules_differ_as_documented():
    """First 50 steps of a 1000-step run: the fixed-α push stays near the ramp, `scaled`
    (α_eff = 10·α) pushes t clearly above it, `linear` is the ramp."""
    traces = {}
    for sched in ("adaptive", "linear", "scaled"):
        obj = TAID(schedule=sched)
        for k, J in enumerate(losses()):
            obj.after_step(jt(J), ctx(k, total=1000))
        traces[sched] = obj.t.item()
    t_lin = 0.4 + 0.6 * 49 / 1000
    assert traces["linear"] == pytest.approx(t_lin)
    assert traces["adaptive"] == pytest.approx(t_lin, abs=1e-2)  # ~ the ramp
    assert traces["scaled"] > traces["adaptive"] + 0.03           # α_eff = 5e-3


def test_taid_saturates_at_t_end():
    obj = TAID(t_end=0.9, alpha=1.0)
    for k, J in enumerate(losses(200)):
        obj.after_step(jt(J), ctx(k, total=200))
        assert obj.t.item() <= 0.9
    assert obj.t.item() == 0.9


def test_taid_state_round_trips_and_continues_identically():
    s, t, y = batch(seed=12)
    seq = losses(40, seed=3)
    a = TAID(alpha=0.05)
    for k, J in enumerate(seq[:20]):
        a.after_step(jt(J), ctx(k, total=400))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert set(state) == {"t", "momentum", "prev_loss", "started"}
    b = TAID(alpha=0.05)
    b.load_state_dict(state)
    assert b.t.item() == a.t.item() and bool(b.started)
    for k, J in enumerate(seq[20:], start=20):
        for obj in (a, b):
            obj.after_step(jt(J), ctx(k, total=400))
        assert b.t.item() == a.t.item() and b.momentum.item() == a.momentum.item()
        assert b.prev_loss.item() == a.prev_loss.item()
    assert b(tt(s), tt(t), None)["loss"].item() == a(tt(s), tt(t), None)["loss"].item()
    # checkpoints are loaded with weights_only=True
    import io
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = TAID(alpha=0.05)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert c.t.item() == a.t.item()


def test_taid_logged_t_is_the_value_used_not_an_alias():
    s, t, y = batch(seed=13)
    obj = TAID(alpha=0.5)
    obj.after_step(jt(2.0), ctx(0))
    out = obj(tt(s), tt(t), None, ctx(1))
    logged = out["t"].item()
    obj.after_step(out, ctx(1))  # J = out["taid"]
    assert obj.t.item() > logged and out["t"].item() == logged
    assert out["momentum"].item() == 0.0


def test_taid_update_uses_the_taid_term():
    """J is the TAID term, not `loss` (which may include ce_weight·CE), like the official."""
    a, b = TAID(alpha=0.5), TAID(alpha=0.5)
    for k, J in enumerate([3.0, 2.0, 1.5]):
        a.after_step({"loss": torch.tensor(J + 100.0), **jt(J)}, ctx(k))
        b.after_step(jt(J), ctx(k))
    assert a.t.item() == b.t.item()


# ---------------------------------------------------------------- DIST
@pytest.mark.parametrize("T,beta,gamma,cw", [(4.0, 2.0, 2.0, 1.0), (1.0, 1.0, 1.0, 1.0),
                                             (2.0, 0.5, 3.0, 0.2)])
def test_dist_matches_numpy(T, beta, gamma, cw):
    s, t, y = batch(seed=14)
    out = DIST(temperature=T, beta=beta, gamma=gamma, ce_weight=cw)(tt(s), tt(t), tt(y))
    loss, ce, inter, intra = np_dist(s, t, y, T, beta, gamma, cw)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out["inter"].item() == pytest.approx(inter, rel=1e-10)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-10)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-10)


def test_dist_zero_when_student_equals_teacher():
    s, _, y = batch(seed=15)
    for T in (1.0, 4.0):
        out = DIST(temperature=T)(tt(s), tt(s.copy()), tt(y))
        assert abs(out["inter"].item()) < 1e-5 and abs(out["intra"].item()) < 1e-5
        assert out["loss"].item() == pytest.approx(np_ce(s, y), abs=1e-4)


def test_dist_batch_of_one_is_a_user_error():
    s, t, y = batch(B=1)
    with pytest.raises(UserError) as err:
        DIST()(tt(s), tt(t), tt(y))
    assert err.value.key == "trainer.batch_size"
    s, t, y = batch(B=2)
    assert torch.isfinite(DIST()(tt(s), tt(t), tt(y))["loss"])


# ---------------------------------------------------------------- SSLD
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ssld_matches_numpy_symmetric_and_label_free(T):
    s, t, y = batch(seed=16)
    out = SSLD(temperature=T)(tt(s), tt(t), None)
    assert out["loss"].item() == pytest.approx(np_skl(s, t, T), rel=1e-12)
    swapped = SSLD(temperature=T)(tt(t), tt(s), None)
    assert swapped["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-12)
    same = SSLD(temperature=T)(tt(s), tt(s.copy()), None)
    assert same["loss"].item() == pytest.approx(0, abs=1e-14)


def test_ssld_never_reads_targets():
    class Poison:  # any attribute access / use would raise
        def __getattr__(self, name):
            raise AssertionError(f"targets.{name} was read")

    s, t, _ = batch(seed=17)
    assert SSLD()(tt(s), tt(t), Poison())["loss"].item() == pytest.approx(np_skl(s, t), rel=1e-12)


def test_ssld_gradient_is_both_kls():
    """d/ds of ½[KL(p_t‖p_s) + KL(p_s‖p_t)] per sample: ½[(p_s − p_t) + p_s⊙(g − Σ p_s g)],
    g = log p_s − log p_t; the teacher gets none."""
    s, t, y = batch(B=6, C=5, seed=18)
    st, tt_ = tt(s, True), tt(t, True)
    SSLD()(st, tt_, None)["loss"].backward()
    assert tt_.grad is None
    ps, pt = np_softmax(s), np_softmax(t)
    g = np.log(ps) - np.log(pt)
    rev = ps * (g - (ps * g).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(st.grad.numpy(), 0.5 * ((ps - pt) + rev) / 6, rtol=1e-9, atol=1e-14)


def test_ssld_with_ce():
    s, t, y = batch(seed=19)
    obj = SSLD(ce_weight=0.5)
    out = obj(tt(s), tt(t), tt(y))
    assert set(out) == {"loss", "skl", "ce"}
    assert out["loss"].item() == pytest.approx(np_skl(s, t) + 0.5 * np_ce(s, y), rel=1e-12)
    with pytest.raises(ValueError):
        obj(tt(s), tt(t), None)


# ---------------------------------------------------------------- MIX-KD
def test_mixkd_matches_numpy_hard_and_soft():
    s, t, y = batch(seed=20)
    out = MixKD()(tt(s), tt(t), tt(y))
    loss, soft_ce, kd = np_mixkd(s, t, np.eye(10)[y], 0.1, 0.9)
    assert out["soft_ce"].item() == pytest.approx(soft_ce, rel=1e-12)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-12)
    # mixed targets, as partial mixup makes them: a·onehot(y1) + (1 − a)·onehot(y2)
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(16, 1))
    a[rng.uniform(size=16) < 0.5] = 1.0
    y2 = rng.integers(0, 10, size=16)
    mixed = a * np.eye(10)[y] + (1 - a) * np.eye(10)[y2]
    out = MixKD(soft_weight=0.3, kd_weight=2.0)(tt(s), tt(t), tt(mixed))
    assert out["loss"].item() == pytest.approx(np_mixkd(s, t, mixed, 0.3, 2.0)[0], rel=1e-12)


def test_mixkd_hard_labels_equal_one_hot_soft_targets():
    s, t, y = batch(seed=21)
    st1, st2 = tt(s, True), tt(s, True)
    hard = MixKD()(st1, tt(t), tt(y))
    soft = MixKD()(st2, tt(t), F.one_hot(tt(y), 10).double())
    for k in hard:
        assert hard[k].item() == pytest.approx(soft[k].item(), rel=1e-15)
    hard["loss"].backward()
    soft["loss"].backward()
    np.testing.assert_allclose(st1.grad.numpy(), st2.grad.numpy(), rtol=1e-13)
    # float32 one-hot targets with float32 logits too
    assert MixKD()(tt(s).float(), tt(t).float(), F.one_hot(tt(y), 10).float())["loss"].item() == \
        pytest.approx(hard["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("c", [0.1, 3.0, 25.0])
def test_mixkd_invariant_to_scaling_both_logits(c):
    s, t, y = batch(seed=22)
    base = MixKD()(tt(s), tt(t), tt(y))
    scaled = MixKD()(tt(c * s), tt(c * t), tt(y))
    for k in base:
        assert scaled[k].item() == pytest.approx(base[k].item(), rel=1e-6)
    # each side is normalised by its own σ, so scaling only one side changes nothing either
    one_side = MixKD()(tt(c * s), tt(t), tt(y))
    assert one_side["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-6)
    # a per-row shift leaves σ unchanged and the softmax absorbs it
    shifted = MixKD()(tt(s + 5.0), tt(t - 2.0), tt(y))
    assert shifted["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-9)


def test_mixkd_bad_targets():
    s, t, y = batch()
    with pytest.raises(ValueError):
        MixKD()(tt(s), tt(t), tt(y)[:3])
    with pytest.raises(ValueError):
        MixKD()(tt(s), tt(t), tt(s)[:, :4])
    with pytest.raises(ValueError):
        MixKD()(tt(s), tt(t), None)
