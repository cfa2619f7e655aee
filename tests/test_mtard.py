"""MTARD (METHODS.md "MTARD"): the two KL terms, entropies and balanced loss vs float64 NumPy,
the exact student gradient (teacher detached, student unscaled), hand-computed traces of the
loss-balance weights (incl. the eta decay at lr decays) and of the entropy-balanced temperatures
(sign rule, clip), state round trip, which teacher sees which input, and an end-to-end digits
run with a two-teacher pool that stops and resumes bit-exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill_cli.evaluation.adversarial import NormalizedModel, pgd
from distill_cli.config.build import build_data, build_model, build_objective
from distill_cli.errors import UserError
from distill_cli.training.run import RunInterrupted, run
from distill_cli.losses.base import PoolObjective, StepContext, StepObjective
from distill_cli.losses.mtard import MTARD

from conftest import DIGITS, make_cfg

B, C = 6, 5
BUFFERS = {"w_nat", "tau_adv", "tau_nat", "l0", "l0_set"}


def ctx(epoch: int, step: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=step, steps_per_epoch=10, total_steps=100)


def logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_nat, s_adv = (torch.randn(B, C, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    t = torch.randn(2, B, C, generator=g, dtype=torch.float64) * 3   # (clean, robust)
    return s_nat, s_adv, t


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_kl_entropy(s, t, tau):
    log_pt = np_log_softmax(t / tau)
    pt = np.exp(log_pt)
    kl = (pt * (log_pt - np_log_softmax(s))).mean()      # mean over the B*C elements
    return kl, -(pt * log_pt).sum(1).mean()


def np_mtard(s_nat, s_adv, t, tau_adv, tau_nat, w_prev, l0, eta):
    adv, h_adv = np_kl_entropy(s_adv, t[1], tau_adv)
    nat, h_nat = np_kl_entropy(s_nat, t[0], tau_nat)
    l0 = (adv, nat) if l0 is None else l0
    r_adv, r_nat = adv / l0[0], nat / l0[1]
    w = w_prev - eta * (w_prev - r_nat / (r_adv + r_nat))
    return {"loss": (1 - w) * adv + w * nat, "adv_kl": adv, "nat_kl": nat, "w_nat": w,
            "w_adv": 1 - w, "h_adv": h_adv, "h_nat": h_nat}


# ------------------------------------------------------------------------ the formula
@pytest.mark.parametrize("state", ["first", "later"])
def test_terms_match_numpy(state):
    s_nat, s_adv, t = logits(1)
    obj = MTARD()
    obj.tau_adv.fill_(2.5)
    obj.tau_nat.fill_(1.7)
    w_prev, l0 = 0.5, None
    if state == "later":   # L0 recorded, weights already moved
        obj.w_nat.fill_(0.3)
        obj.l0.copy_(torch.tensor([0.9, 0.25], dtype=torch.float64))
        obj.l0_set.fill_(1.0)
        w_prev, l0 = 0.3, (0.9, 0.25)
    got = obj(s_nat, t, None, ctx(1), student_adv_logits=s_adv)
    want = np_mtard(s_nat.numpy(), s_adv.numpy(), t.numpy(), 2.5, 1.7, w_prev, l0, 0.025)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-10, abs=1e-14), k
    assert float(got["tau_adv"]) == 2.5 and float(got["tau_nat"]) == 1.7
    assert "ce" not in got   # no label CE
    if state == "first":   # r = (1, 1): the first update keeps 0.5
        assert float(got["w_nat"]) == pytest.approx(0.5, abs=1e-15)


def test_student_gradient_is_exact_and_teacher_gets_none():
    """d/ds mean_bc[p_t (log p_t − log_softmax(s))] = (softmax(s) − p_t)/(B·C): the student is
    NOT temperature-scaled, the weights are constants of the step, the teachers are detached."""
    s_nat, s_adv, t = logits(2)
    s_nat.requires_grad_(True), s_adv.requires_grad_(True), t.requires_grad_(True)
    obj = MTARD()
    obj.tau_adv.fill_(3.0)
    obj.tau_nat.fill_(2.0)
    obj.w_nat.fill_(0.4)
    obj.l0.copy_(torch.tensor([2.0, 1.0], dtype=torch.float64))
    obj.l0_set.fill_(1.0)
    got = obj(s_nat, t, None, student_adv_logits=s_adv)
    got["loss"].backward()
    assert t.grad is None
    w = float(got["w_nat"])
    sm = lambda z: np.exp(np_log_softmax(z))
    tn = t.detach().numpy()
    np.testing.assert_allclose(s_nat.grad.numpy(),
                               w * (sm(s_nat.detach().numpy()) - sm(tn[0] / 2.0)) / (B * C),
                               rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(s_adv.grad.numpy(),
                               (1 - w) * (sm(s_adv.detach().numpy()) - sm(tn[1] / 3.0)) / (B * C),
                               rtol=1e-10, atol=1e-15)


def test_identical_student_and_teacher_give_zero_kl_and_one_teacher_serves_both():
    s, _, _ = logits(3)
    got = MTARD()(s, s.clone(), None)            # a [B, C] teacher: both views
    assert float(got["adv_kl"]) == pytest.approx(0, abs=1e-15)
    assert float(got["nat_kl"]) == pytest.approx(0, abs=1e-15)
    with pytest.raises(ValueError):
        MTARD()(s, torch.zeros(3, B, C, dtype=torch.float64), None)
    with pytest.raises(ValueError):
        MTARD()(s, None, None)


# ------------------------------------------------------------------------ the update rules
def feed(obj, adv, nat, h_adv, h_nat, epoch=1):
    f = lambda v: torch.tensor(v, dtype=torch.float32)
    obj.after_step({"adv_kl": f(adv), "nat_kl": f(nat), "h_adv": f(h_adv), "h_nat": f(h_nat)},
                   ctx(epoch))


def test_weight_and_temperature_traces_by_hand():
    obj = MTARD(decay_epochs=[2])   # eta, eta_tau x0.1 from epoch 3 on
    trace = [  # (L_adv, L_nat, H_adv, H_nat, epoch) -> hand-computed (w_nat, tau_adv, tau_nat)
        # L0 = (0.8, 0.4); r = (1, 1) -> target 1/2: w stays 0.5. H_a > H_n: tau_a -0.001 is
        # clipped at 1, tau_n +0.001
        ((0.8, 0.4, 0.9, 0.5, 1), (0.5, 1.0, 1.001)),
        # r = (0.5, 1) -> target 2/3: w = 0.5 - 0.025*(0.5 - 2/3) = 0.5 + 1/240; H_a < H_n
        ((0.4, 0.4, 0.2, 0.6, 1), (0.5 + 1 / 240, 1.001, 1.0)),
        # r = (0.25, 0.25) -> 1/2: w = w - 0.025*(1/240) = 0.5 + 0.975/240; equal H: no move
        ((0.2, 0.1, 0.3, 0.3, 2), (0.5 + 0.975 / 240, 1.001, 1.0)),
        # epoch 3 > 2: eta 0.0025, eta_tau 0.0001; r = (1, 0) -> target 0: w *= 0.9975
        ((0.8, 0.0, 0.7, 0.1, 3), ((0.5 + 0.975 / 240) * 0.9975, 1.0009, 1.0001)),
    ]
    for (adv, nat, ha, hn, epoch), (w, ta, tn) in trace:
        feed(obj, adv, nat, ha, hn, epoch)
        assert float(obj.w_nat) == pytest.approx(w, abs=1e-7)
        assert float(obj.tau_adv) == pytest.approx(ta, abs=1e-12)
        assert float(obj.tau_nat) == pytest.approx(tn, abs=1e-12)
        assert obj.l0.tolist() == pytest.approx([0.8, 0.4])   # L0 = the first batch, kept
    assert obj.teacher_weights.tolist() == pytest.approx([float(obj.w_nat),
                                                          1 - float(obj.w_nat)])


def test_temperatures_clip_at_the_top():
    obj = MTARD()
    obj.tau_adv.fill_(5.0)
    obj.tau_nat.fill_(9.9995)
    feed(obj, 0.5, 0.5, 0.9, 0.1)     # H_a > H_n: tau_a down, tau_n up (to the clip)
    assert float(obj.tau_adv) == pytest.approx(4.999, abs=1e-12)
    assert float(obj.tau_nat) == 10.0
    feed(obj, 0.5, 0.5, 0.9, 0.1)
    assert float(obj.tau_nat) == 10.0 and float(obj.tau_adv) == pytest.approx(4.998, abs=1e-12)


def test_forward_uses_the_updated_weight_and_the_old_temperature():
    """Official order: this batch's losses update w before weighting this batch's loss;
    temperatures move after the loss (the next step sees them)."""
    obj = MTARD()
    for i in range(4):
        s_nat, s_adv, t = logits(10 + i)
        before = (float(obj.tau_adv), float(obj.tau_nat))
        terms = obj(s_nat, t, None, ctx(1), student_adv_logits=s_adv)
        obj.after_step({k: v.detach() for k, v in terms.items()}, ctx(1))
        assert float(obj.w_nat) == float(terms["w_nat"])
        assert (float(terms["tau_adv"]), float(terms["tau_nat"])) == before
        sign = np.sign(float(terms["h_adv"]) - float(terms["h_nat"]))
        assert float(obj.tau_nat) == pytest.approx(max(1.0, before[1] + 0.001 * sign))


def test_state_round_trip():
    obj = MTARD()
    for i in range(3):
        s_nat, s_adv, t = logits(20 + i)
        obj.after_step(obj(s_nat, t, None, ctx(1), student_adv_logits=s_adv), ctx(1))
    state = obj.state_dict()
    assert set(state) == BUFFERS
    assert all(v.dtype == torch.float64 for v in state.values())
    fresh = MTARD()
    fresh.load_state_dict(state)
    s_nat, s_adv, t = logits(30)
    a = obj(s_nat, t, None, ctx(1), student_adv_logits=s_adv)
    b = fresh(s_nat, t, None, ctx(1), student_adv_logits=s_adv)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ config and wiring
def test_config_decays_follow_the_multistep_milestones_and_errors():
    obj = build_objective(make_cfg(["loss=mtard", "scheduler=multistep",
                                    "scheduler.milestones=[3,5]"]).loss)
    assert obj.decay_epochs == [3, 5] and [obj.decays(ctx(e)) for e in (3, 4, 6)] == [0, 1, 2]
    obj = build_objective(make_cfg(["loss=mtard", "scheduler=cosine"]).loss)
    assert obj.decay_epochs == [] and obj.decays(ctx(100)) == 0
    assert (obj.eps, obj.step_size, obj.steps, obj.random_start) == (8 / 255, 2 / 255, 10,
                                                                     "normal_0.001")
    assert isinstance(obj, StepObjective) and isinstance(obj, PoolObjective) and obj.needs_teacher
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(obj(s, t, y)["loss"])   # test_config's logit-only call
    for kw, key in (({"eta": 2}, "loss.eta"), ({"tau_min": 0}, "loss.tau_min"),
                    ({"decay_epochs": ["x"]}, "loss.decay_epochs"), ({"eps": -1}, "loss.eps")):
        with pytest.raises(UserError) as err:
            MTARD(**kw)
        assert err.value.key == key


@pytest.fixture(scope="module")
def digits():
    cfg = make_cfg(DIGITS + ["student=resnet8"])
    data = build_data(cfg.dataset)
    return cfg, data


def test_bind_wants_two_teachers(digits):
    cfg, data = digits
    net = build_model(cfg.student, "student", data)
    for pool in (net, [net], [net, net, net]):
        with pytest.raises(UserError) as err:
            MTARD().bind(net, pool, data)
        assert err.value.key == "teachers"


def test_robust_teacher_sees_x_adv_and_clean_teacher_sees_x(digits, digits_teacher):
    cfg, data = digits
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data).train()
    clean = build_model(cfg.student, "student", data)
    clean.load_state_dict(torch.load(digits_teacher, weights_only=True)["model"])
    robust = build_model(cfg.student, "student", data)   # a different (untrained) network
    for t in (clean, robust):
        t.eval().requires_grad_(False)
    batch = next(iter(data.train.train_batches(32, 0, 1)))
    obj = MTARD(steps=3)
    obj.bind(student, [clean, robust], data)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(5)
    terms = obj.step_terms(student, [clean, robust], batch, ctx(1))
    assert student.training and not clean.training and not robust.training
    terms["loss"].backward()
    assert all(p.grad is None for t in (clean, robust) for p in t.parameters())
    student.load_state_dict(before)
    torch.manual_seed(5)
    w = NormalizedModel(student, data.train.mean, data.train.std)
    x_adv = w.normalize(pgd(w, w.pixels(batch.x), batch.y, 8 / 255, 2 / 255, 3, "normal_0.001"))
    with torch.no_grad():
        s_adv, t_adv = student(x_adv), robust(x_adv)
        s_nat, t_nat = student(batch.x), clean(batch.x)
    adv, _ = np_kl_entropy(s_adv.double().numpy(), t_adv.double().numpy(), 1.0)
    nat, _ = np_kl_entropy(s_nat.double().numpy(), t_nat.double().numpy(), 1.0)
    assert float(terms["adv_kl"]) == pytest.approx(adv, rel=1e-4)
    assert float(terms["nat_kl"]) == pytest.approx(nat, rel=1e-4)


# ------------------------------------------------------------------------ end to end
def _state(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def test_mtard_run_logs_its_terms_and_resumes_bit_exactly(tmp_path, digits_teacher):
    pool = f"teachers=[{{arch: resnet8, checkpoint: {digits_teacher}}}," \
           f"{{arch: resnet8, checkpoint: {digits_teacher}}}]"
    # multistep at epoch 1: epoch 2 runs with the decayed eta (and lr)
    base = DIGITS + ["student=resnet8", "loss=mtard", pool, "scheduler=multistep",
                     "scheduler.milestones=[1]", "loss.steps=3"]
    full = tmp_path / "full"
    s = run(make_cfg(base), full, tty=False)
    assert s["status"] == "finished" and s["best/test/acc1"] > 20.0   # chance: 10
    assert s["teachers/weights"] == [0.5, 0.5]
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "adv_kl", "nat_kl", "w_nat", "w_adv", "tau_adv", "tau_nat"):
        assert f"train/{key}" in rows[0], key
    assert "train/ce" not in rows[0]
    best = _state(full, "best.pt")
    assert set(best["objective"]) == BUFFERS and not BUFFERS & set(best["model"])
    assert float(best["objective"]["l0_set"]) == 1.0

    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=27"]), parted, tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
    a, b = _state(full), _state(parted)
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strip = lambda rs: [{k: v for k, v in r.items() if "images_per_s" not in k} for r in rs]
    rows_b = [json.loads(r) for r in (parted / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows) == strip(rows_b)
