"""Token-level LM objectives (distill_cli/tasks/lm/divergences.py, tasks/lm/methods/): every
divergence against an independent float64 reference written from the formula with explicit sums
over the vocabulary (plain Python floats, none of the code under test), the per-token mean over
counted tokens, the identities and limits, gradients, TAID's t under padding, the YAMLs."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.taid import TAID
from distill_cli.tasks.lm import divergences as D
from distill_cli.tasks.lm.methods.fkl import FKL
from distill_cli.tasks.lm.methods.gkd import GKD
from distill_cli.tasks.lm.methods.lm_ce import LMCE
from distill_cli.tasks.lm.methods.lm_taid import LMTAID
from distill_cli.tasks.lm.methods.rkl import RKL
from distill_cli.tasks.lm.methods.skl import SKL
from distill_cli.tasks.lm.methods.srkl import SRKL
from distill_cli.tasks.lm.methods.topk import TopK
from distill_cli.tasks.lm.methods.tvd import TVD

B, T, V = 2, 5, 7
F64 = torch.float64


# ----------------------------------------------------------------------------- references
def softmax_ref(z, temp=1.0):
    m = max(z)
    e = [math.exp((zi - m) / temp) for zi in z]
    s = sum(e)
    return [ei / s for ei in e]


def kl_ref(p, q):
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0)


def fkl_ref(s, t, temp=1.0):
    return kl_ref(softmax_ref(t, temp), softmax_ref(s, temp))


def rkl_ref(s, t, temp=1.0):
    return kl_ref(softmax_ref(s, temp), softmax_ref(t, temp))


def jsd_ref(s, t, beta, temp=1.0):
    p, q = softmax_ref(t, temp), softmax_ref(s, temp)
    if beta == 0:
        return kl_ref(p, q)
    if beta == 1:
        return kl_ref(q, p)
    m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q)]
    return beta * kl_ref(p, m) + (1 - beta) * kl_ref(q, m)


def skl_ref(s, t, alpha):
    p, q = softmax_ref(t), softmax_ref(s)
    return kl_ref(p, [alpha * pv + (1 - alpha) * qv for pv, qv in zip(p, q)])


def srkl_ref(s, t, alpha):
    p, q = softmax_ref(t), softmax_ref(s)
    return kl_ref(q, [alpha * qv + (1 - alpha) * pv for pv, qv in zip(p, q)])


def tvd_ref(s, t):
    return 0.5 * sum(abs(pv - qv) for pv, qv in zip(softmax_ref(t), softmax_ref(s)))


def topk_ref(s, t, k, temp=1.0):
    """(k+1)-bin KL: teacher's top-k probabilities (T = 1) tempered as p^(1/T) with the bucket
    (1 − Σp)^(1/T), renormalised; the student's tempered probabilities of those tokens + the rest."""
    p1 = softmax_ref(t)
    top = sorted(range(len(t)), key=lambda v: -p1[v])[:k]
    bins = [p1[v] ** (1 / temp) for v in top]
    q = softmax_ref(s, temp)
    qbins = [q[v] for v in top]
    if k < len(t):
        bins.append((1 - sum(p1[v] for v in top)) ** (1 / temp))
        qbins.append(sum(q[v] for v in range(len(t)) if v not in top))
    z = sum(bins)
    return kl_ref([b / z for b in bins], qbins)


def nll_ref(s, y):
    return -math.log(softmax_ref(s)[y])


def per_position(fn, s, t, *args):
    """[B, T] of a reference on each position's rows."""
    return [[fn(s[b, i].tolist(), t[b, i].tolist(), *args) for i in range(s.shape[1])]
            for b in range(s.shape[0])]


def assert_close(got, ref, rtol=1e-10):
    assert torch.allclose(got, torch.tensor(ref, dtype=F64), rtol=rtol, atol=1e-13), (got, ref)


def masked_mean_ref(values, y):
    kept = [values[b][i] for b in range(len(values)) for i in range(len(values[b]))
            if y[b, i].item() != -100]
    return sum(kept) / len(kept)


# ----------------------------------------------------------------------------- fixtures
def logits(seed, shape=(B, T, V), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def targets(seed=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3:] = -100   # padding at the end of one row
    y[1, 0] = -100    # a prompt position
    return y


DIVERGENCES = [  # (name, function under test, reference)
    ("fkl", lambda s, t: D.forward_kl(s, t), fkl_ref),
    ("fkl_T2", lambda s, t: D.forward_kl(s, t, 2.0), lambda s, t: fkl_ref(s, t, 2.0)),
    ("rkl", lambda s, t: D.reverse_kl(s, t), rkl_ref),
    ("rkl_T3", lambda s, t: D.reverse_kl(s, t, 3.0), lambda s, t: rkl_ref(s, t, 3.0)),
    ("jsd_0", lambda s, t: D.generalized_jsd(s, t, 0.0), lambda s, t: jsd_ref(s, t, 0.0)),
    ("jsd_0.3", lambda s, t: D.generalized_jsd(s, t, 0.3), lambda s, t: jsd_ref(s, t, 0.3)),
    ("jsd_0.5_T2", lambda s, t: D.generalized_jsd(s, t, 0.5, 2.0),
     lambda s, t: jsd_ref(s, t, 0.5, 2.0)),
    ("jsd_1", lambda s, t: D.generalized_jsd(s, t, 1.0), lambda s, t: jsd_ref(s, t, 1.0)),
    ("skl", lambda s, t: D.skew_kl(s, t, 0.1), lambda s, t: skl_ref(s, t, 0.1)),
    ("skl_0.6", lambda s, t: D.skew_kl(s, t, 0.6), lambda s, t: skl_ref(s, t, 0.6)),
    ("srkl", lambda s, t: D.skew_reverse_kl(s, t, 0.1), lambda s, t: srkl_ref(s, t, 0.1)),
    ("srkl_0.6", lambda s, t: D.skew_reverse_kl(s, t, 0.6), lambda s, t: srkl_ref(s, t, 0.6)),
    ("tvd", D.total_variation, tvd_ref),
    ("topk_1", lambda s, t: D.topk_kl_live(s, t, 1), lambda s, t: topk_ref(s, t, 1)),
    ("topk_3", lambda s, t: D.topk_kl_live(s, t, 3), lambda s, t: topk_ref(s, t, 3)),
    ("topk_3_T2", lambda s, t: D.topk_kl_live(s, t, 3, 2.0), lambda s, t: topk_ref(s, t, 3, 2.0)),
    ("topk_3_packed", lambda s, t: D.topk_kl(s, D.pack_topk(t, 3, F64)),
     lambda s, t: topk_ref(s, t, 3)),
    ("topk_V", lambda s, t: D.topk_kl_live(s, t, V), lambda s, t: topk_ref(s, t, V)),
]


@pytest.mark.parametrize("name,fn,ref", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_divergence_matches_reference(name, fn, ref):
    s, t = logits(0), logits(1)
    got = fn(s, t)
    assert got.shape == (B, T) and got.dtype == F64
    assert_close(got, per_position(ref, s, t))


# (objective, its per-position reference on (s, t), T² factor folded in)
OBJECTIVES = [
    (lambda: FKL(temperature=2.0, kd_weight=0.7, ce_weight=0.3), lambda s, t: 4 * fkl_ref(s, t, 2.0)),
    (lambda: RKL(temperature=1.5, kd_weight=0.7, ce_weight=0.3), lambda s, t: 2.25 * rkl_ref(s, t, 1.5)),
    (lambda: GKD(beta=0.3, temperature=2.0, kd_weight=0.7, ce_weight=0.3),
     lambda s, t: jsd_ref(s, t, 0.3, 2.0)),  # TRL: no T²
    (lambda: SKL(alpha=0.2, kd_weight=0.7, ce_weight=0.3), lambda s, t: skl_ref(s, t, 0.2)),
    (lambda: SRKL(alpha=0.2, kd_weight=0.7, ce_weight=0.3), lambda s, t: srkl_ref(s, t, 0.2)),
    (lambda: TVD(kd_weight=0.7, ce_weight=0.3), tvd_ref),
    (lambda: TopK(k=3, temperature=2.0, kd_weight=0.7, ce_weight=0.3),
     lambda s, t: 4 * topk_ref(s, t, 3, 2.0)),
]
OBJ_IDS = ["fkl", "rkl", "gkd", "skl", "srkl", "tvd", "topk"]


@pytest.mark.parametrize("make,ref", OBJECTIVES, ids=OBJ_IDS)
def test_objective_is_the_weighted_mean_over_counted_tokens(make, ref):
    s, t, y = logits(0), logits(1), targets()
    out = make()(s, t, y)
    kd = masked_mean_ref(per_position(ref, s, t), y)
    ce = masked_mean_ref([[nll_ref(s[b, i].tolist(), max(y[b, i].item(), 0)) for i in range(T)]
                          for b in range(B)], y)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-10)
    assert out["loss"].ndim == 0 and not out["kd"].requires_grad


def garbage_at_padding(x, y, value):
    x = x.clone()
    x[y == -100] = value
    return x


@pytest.mark.parametrize("make", [o[0] for o in OBJECTIVES] + [LMCE, LMTAID], ids=OBJ_IDS + ["lm_ce", "lm_taid"])
def test_padding_never_counts_and_only_the_student_gets_gradient(make):
    """Whatever the padded positions hold (huge values, NaN) neither the loss nor the gradient
    changes; the padded positions and the teacher get no gradient."""
    y = targets()
    losses, grads = [], []
    for fill in (None, 1e4, float("nan")):
        s, t = logits(0), logits(1)
        if fill is not None:
            s, t = garbage_at_padding(s, y, fill), garbage_at_padding(t, y, -fill)
        s.requires_grad_(True)
        t.requires_grad_(True)
        objective = make()
        out = objective(s, t if objective.needs_teacher else None, y)
        out["loss"].backward()
        assert t.grad is None
        assert torch.isfinite(s.grad).all()
        assert (s.grad[y == -100] == 0).all() and s.grad[y != -100].abs().sum() > 0
        losses.append(out["loss"].item())
        grads.append(s.grad)
    assert losses[0] == losses[1] == losses[2]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("fn", [D.forward_kl, D.reverse_kl, D.total_variation,
                                lambda s, t: D.generalized_jsd(s, t, 0.3),
                                lambda s, t: D.skew_kl(s, t, 0.1),
                                lambda s, t: D.skew_reverse_kl(s, t, 0.1),
                                lambda s, t: D.topk_kl_live(s, t, 2)],
                         ids=["fkl", "rkl", "tvd", "jsd", "skl", "srkl", "topk"])
def test_divergence_of_a_distribution_with_itself_is_zero(fn):
    z = logits(4)
    assert fn(z, z.clone()).abs().max().item() < 1e-14
    assert (fn(z, logits(5)) > 1e-3).all()  # and does not vanish otherwise


def test_jsd_limits_are_trls():
    """β → 0: JSD_β / β → KL(p‖q) (forward); β → 1: JSD_β / (1−β) → KL(q‖p) (reverse) — TRL's
    fixed semantics (before PR #3043 they were swapped); the endpoints are the unscaled KLs."""
    s, t = logits(0), logits(1)
    fkl, rkl = D.forward_kl(s, t), D.reverse_kl(s, t)
    eps = 1e-6
    assert torch.allclose(D.generalized_jsd(s, t, eps) / eps, fkl, rtol=1e-4)
    assert torch.allclose(D.generalized_jsd(s, t, 1 - eps) / eps, rkl, rtol=1e-4)
    assert torch.equal(D.generalized_jsd(s, t, 0.0), fkl)
    assert torch.equal(D.generalized_jsd(s, t, 1.0), rkl)
    assert not torch.allclose(fkl, rkl)  # so the checks above tell the two apart


def test_skew_with_alpha_zero_is_the_plain_kl():
    s, t = logits(0), logits(1)
    assert torch.allclose(D.skew_kl(s, t, 0.0), D.forward_kl(s, t), rtol=1e-12)
    assert torch.allclose(D.skew_reverse_kl(s, t, 0.0), D.reverse_kl(s, t), rtol=1e-12)
    # and the mixture is in probability space: α → 1 drives both to 0
    assert D.skew_kl(s, t, 0.999).max() < 1e-3 and D.skew_reverse_kl(s, t, 0.999).max() < 1e-3


def test_tvd_is_symmetric_and_bounded():
    s, t = logits(0), logits(1)
    a, b = D.total_variation(s, t), D.total_variation(t, s)
    assert torch.equal(a, b)
    assert (a > 0).all() and (a <= 1).all()


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_with_k_equal_to_v_is_forward_kl(temp):
    s, t = logits(0), logits(1)
    fkl = D.forward_kl(s, t, temp)
    assert torch.allclose(D.topk_kl_live(s, t, V, temp), fkl, rtol=1e-12, atol=1e-15)
    assert torch.allclose(D.topk_kl(s, D.pack_topk(t, V, F64), temp), fkl, rtol=1e-12, atol=1e-15)
    # the store's float32 rows: the same up to float32 rounding
    packed32 = D.pack_topk(t.float(), V)
    assert packed32.dtype == torch.float32
    assert torch.allclose(D.topk_kl(s.float(), packed32, temp).double(), fkl, rtol=1e-4, atol=1e-6)
    objective = TopK(k=V, temperature=temp, kd_weight=1.0, ce_weight=0.0)
    y = targets()
    assert objective(s, t, y)["kd"].item() == pytest.approx(
        temp ** 2 * D.token_mean(fkl, y != -100).item(), rel=1e-12)


def test_topk_stored_rows_equal_the_live_teacher_and_truncate_to_k():
    s, t, y = logits(0), logits(1), targets()
    live = TopK(k=3, temperature=2.0)(s, t, y)
    stored = TopK(k=3, temperature=2.0)(s, D.pack_topk(t, 3, F64), y)
    wider = TopK(k=3, temperature=2.0)(s, D.pack_topk(t, 5, F64), y)  # top-5 rows, k = 3
    assert live["kd"].item() == pytest.approx(stored["kd"].item(), rel=1e-12)
    assert wider["kd"].item() == pytest.approx(stored["kd"].item(), rel=1e-12)


def test_pack_topk_layout():
    t = logits(1)
    packed = D.pack_topk(t, 3)
    assert packed.shape == (B, T, 6) and packed.dtype == torch.float32
    values, idx = D.unpack_topk(packed)
    log_p = torch.log_softmax(t, dim=-1)
    assert torch.equal(idx, log_p.argsort(dim=-1, descending=True)[..., :3])
    assert torch.allclose(values.double(), log_p.gather(-1, idx), atol=1e-6)
    assert (values[..., :-1] >= values[..., 1:]).all()  # descending
    with pytest.raises(ValueError, match="dense logits"):
        D.pack_topk(torch.zeros(2, 8), 4)  # 2k == V is ambiguous with dense logits
    with pytest.raises(ValueError, match="1 <= k"):
        D.pack_topk(torch.zeros(2, 8), 9)


def test_temperature_scales_the_objectives():
    """FKL/RKL/TopK carry T² (Hinton / DistillKit), GKD does not (TRL); T changes the value."""
    s, t, y = logits(0), logits(1), targets()
    m = y != -100
    for cls in (FKL, RKL):
        fn = D.forward_kl if cls is FKL else D.reverse_kl
        kd = cls(temperature=3.0)(s, t, y)["kd"].item()
        assert kd == pytest.approx(9 * D.token_mean(fn(s, t, 3.0), m).item(), rel=1e-12)
        assert kd != pytest.approx(cls(temperature=1.0)(s, t, y)["kd"].item(), rel=1e-3)
    kd = GKD(beta=0.5, temperature=3.0)(s, t, y)["kd"].item()
    assert kd == pytest.approx(D.token_mean(D.generalized_jsd(s, t, 0.5, 3.0), m).item(), rel=1e-12)


def test_masked_vocabulary_slots_are_safe():
    """-inf logits (a vocabulary slot masked in the teacher, or in both models) give finite
    values and finite gradients; slots of probability 0 count 0."""
    s, t, y = logits(0), logits(1), targets()
    y[y == 6] = 0  # the student gives token 6 no mass below: as a target its NLL would be +inf
    t[..., 5] = float("-inf")
    s_both = s.clone()
    s_both[..., 6] = float("-inf")
    t_both = logits(1)  # only slot 6 masked, in both models
    t_both[..., 6] = float("-inf")
    for make, name in zip([o[0] for o in OBJECTIVES] + [LMTAID], OBJ_IDS + ["lm_taid"]):
        # reverse KL of a student with mass where the teacher has none is +inf: truly
        cases = ((s_both, t_both),) if name == "rkl" else ((s, t), (s_both, t_both))
        for student, teacher in cases:
            x = student.clone().requires_grad_(True)
            out = make()(x, teacher, y)
            out["loss"].backward()
            assert torch.isfinite(out["loss"]) and torch.isfinite(x.grad).all(), name
    assert torch.isinf(D.reverse_kl(s, t)).all()
    # and the value is the reference with the masked slot at probability 0
    assert_close(D.forward_kl(s, t), per_position(fkl_ref, s, t))
    assert_close(D.generalized_jsd(s_both, t_both, 0.4),
                 per_position(lambda a, b: jsd_ref(a, b, 0.4), s_both, t_both))


def test_a_batch_without_counted_tokens_gives_zero():
    s = logits(0).requires_grad_(True)
    y = torch.full((B, T), -100)
    for objective in (FKL(), GKD(), TopK(k=2), LMCE(), LMTAID()):
        out = objective(s, logits(1) if objective.needs_teacher else None, y)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
        assert (s.grad == 0).all()


def test_lm_ce_is_next_token_cross_entropy():
    s, y = logits(0), targets()
    ref = torch.nn.functional.cross_entropy(s.reshape(-1, V), y.reshape(-1), ignore_index=-100)
    out = LMCE()(s, None, y)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-12)
    assert LMCE.needs_teacher is False and LMCE.task_name == "lm"


# ----------------------------------------------------------------------------- TAID per token
def test_lm_taid_matches_the_per_token_formula_and_reuses_the_schedule():
    s, t, y = logits(0), logits(1), targets()
    objective = LMTAID(t_start=0.3, kd_weight=0.7, ce_weight=0.3)
    out = objective(s, t, y)
    tt = 0.3

    def taid_ref(a, b):
        p = softmax_ref([(1 - tt) * ai + tt * bi for ai, bi in zip(a, b)])
        return -sum(pv * math.log(qv) for pv, qv in zip(p, softmax_ref(a)))

    taid = masked_mean_ref(per_position(taid_ref, s, t), y)
    assert out["taid"].item() == pytest.approx(taid, rel=1e-10)
    ce = out["ce"].item()
    assert out["loss"].item() == pytest.approx(0.7 * taid + 0.3 * ce, rel=1e-10)
    assert isinstance(objective, TAID) and LMTAID.after_step is TAID.after_step
    assert objective.task_name == "lm" and objective.uses_labels


def test_lm_taid_padding_does_not_move_t():
    """Two runs that differ only at padded positions keep the same losses and the same t, step
    after step (t does move)."""
    y = targets()
    runs = []
    for fill in (None, 50.0):
        objective = LMTAID(t_start=0.2, alpha=0.05)
        ts = []
        for step in range(6):
            s, t = logits(10 + step), logits(20 + step, scale=1.0 + step)
            if fill is not None:
                s, t = garbage_at_padding(s, y, fill), garbage_at_padding(t, y, -fill)
            terms = objective(s, t, y)
            objective.after_step(terms, StepContext(epoch=1, step=step, steps_per_epoch=6,
                                                    total_steps=600))
            ts.append((terms["taid"].item(), objective.t.item()))
        runs.append(ts)
    assert runs[0] == runs[1]
    assert runs[0][-1][1] > 0.2  # t moved off t_start


def test_lm_taid_target_is_detached_and_moves_with_t():
    s, t, y = logits(0).requires_grad_(True), logits(1), targets()
    objective = LMTAID()
    objective(s, t, y)["loss"].backward()
    # p_t is constant for the gradient: d/ds of −Σ p log softmax(s) = softmax(s) − p, per token
    with torch.no_grad():
        p = torch.softmax(0.6 * s + 0.4 * t, dim=-1)
        expected = (torch.softmax(s, dim=-1) - p) / (y != -100).sum()
        expected[y == -100] = 0
    assert torch.allclose(s.grad, expected, atol=1e-14)
    objective.t.fill_(1.0)
    at_one = objective(s, t, y)["taid"].item()
    ref = D.token_mean(-(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1), y != -100)
    assert at_one == pytest.approx(ref.item(), rel=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,key", [
    (lambda: FKL(temperature=0), "loss.temperature"),
    (lambda: RKL(temperature=float("nan")), "loss.temperature"),
    (lambda: GKD(beta=1.5), "loss.beta"),
    (lambda: GKD(lmbda=-0.1), "loss.lmbda"),
    (lambda: SKL(alpha=1.0), "loss.alpha"),
    (lambda: SRKL(alpha=-0.1), "loss.alpha"),
    (lambda: TopK(k=0), "loss.k"),
    (lambda: TopK(k=2.5), "loss.k"),
    (lambda: TVD(kd_weight=-1), "loss.kd_weight"),
    (lambda: FKL(kd_weight=0, ce_weight=0), "loss.kd_weight"),
    (lambda: LMTAID(kd_weight=0, ce_weight=0), "loss.kd_weight"),
    (lambda: LMTAID(t_start=1.5), "loss.t_start"),
], ids=["T0", "Tnan", "beta", "lmbda", "skl_alpha", "srkl_alpha", "k0", "kfrac", "negweight",
        "zeroweights", "taid_zeroweights", "taid_tstart"])
def test_bad_options_are_user_errors(make, key):
    with pytest.raises(UserError) as err:
        make()
    assert err.value.key == key


def test_bad_signals_at_call_time():
    s, t, y = logits(0), logits(1), targets()
    with pytest.raises(UserError, match="exceeds the vocabulary") as err:
        TopK(k=V + 1)(s, t, y)
    assert err.value.key == "loss.k"
    with pytest.raises(UserError, match="top 2 tokens") as err:
        TopK(k=3)(s, D.pack_topk(t, 2, F64), y)  # stored rows hold fewer than k
    assert err.value.key == "loss.k"
    wide = logits(1, shape=(B, T, V + 2))  # a teacher with another vocabulary
    for objective in (FKL(), GKD(), LMTAID()):
        with pytest.raises(UserError, match="vocabulary"):
            objective(s, wide, y)
    with pytest.raises(UserError, match="vocabulary"):
        FKL()(s, D.pack_topk(t, 2, F64), y)  # stored top-k rows given to a dense loss
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        FKL()(s[0], t[0], y[0])
    with pytest.raises(ValueError, match="integer token ids"):
        FKL()(s, t, y.double())
    with pytest.raises(ValueError, match="integer token ids"):
        FKL()(s, t, y[:, :-1])
    with pytest.raises(ValueError, match="needs teacher"):
        GKD()(s, None, y)


# ----------------------------------------------------------------------------- YAMLs
YAMLS = {"fkl": FKL, "rkl": RKL, "gkd": GKD, "skl": SKL, "srkl": SRKL, "tvd": TVD, "topk": TopK,
         "lm_ce": LMCE, "lm_taid": LMTAID}


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_builds_its_class_with_the_class_defaults(name):
    cls = YAMLS[name]
    cfg = OmegaConf.load(Path(CONF_DIR) / "loss" / f"{name}.yaml")
    objective = instantiate(cfg)
    assert type(objective) is cls and objective.task_name == "lm"
    opts = OmegaConf.to_container(cfg, resolve=True)
    assert opts.pop("_target_") == f"{cls.__module__}.{cls.__name__}"
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
              if k not in ("self", "args", "kwargs")}
    assert opts == params  # every option, with the class default
    s, t, y = logits(0, shape=(2, 3, 200)), logits(1, shape=(2, 3, 200)), torch.zeros(2, 3).long()
    terms = objective(s, t if objective.needs_teacher else None, y)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
