"""BD-KD-inspired online distillation: the entropy-gap mixing weight and both losses vs float64
NumPy, the weight's direction, no gradient across the two networks, an end-to-end online run
(the teacher learns; both networks reported) and bit-exact resume of both networks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distill_cli.config.build import build_data, build_objective
from distill_cli.errors import UserError
from distill_cli.training.run import RunInterrupted, run
from distill_cli.losses.bdkd import BDKD, mix_weight
from distill_cli.teachers.resolve import online_teacher

from conftest import DIGITS, make_cfg

B, NC = 10, 6
ONLINE = DIGITS + ["student=mlp", "teacher=mlp", "teacher.hidden=[64]", "loss=bdkd"]


def logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, NC, generator=g, dtype=torch.float64) * torch.linspace(0.3, 4, B)[:, None]
    t = torch.randn(B, NC, generator=g, dtype=torch.float64) * 2
    return s, t, torch.randint(0, NC, (B,), generator=g)


# ---------------------------------------------------------------- NumPy reference (float64)
def np_log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_entropy(z):
    lp = np_log_softmax(z)
    return -(np.exp(lp) * lp).sum(axis=1)


def np_mix_weight(s, t, k):
    gap = (np_entropy(t) - np_entropy(s)) / math.log(s.shape[1])
    return 1.0 / (1.0 + np.exp(-k * gap))


def np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def np_bdkd(s, t, y, T, k, ce_w, kd_w, tce_w, trkl_w):
    ls, lt = np_log_softmax(s / T), np_log_softmax(t / T)
    w = np_mix_weight(s, t, k)
    kd = T * T * np.mean(w * np_kl(lt, ls) + (1 - w) * np_kl(ls, lt))
    ce = -np.mean(np_log_softmax(s)[np.arange(len(y)), y])
    tce = -np.mean(np_log_softmax(t)[np.arange(len(y)), y])
    trkl = T * T * np.mean(np_kl(ls, lt))
    return {"loss": ce_w * ce + kd_w * kd, "ce": ce, "kd": kd, "mix_weight": w.mean()}, \
        {"loss": tce_w * tce + trkl_w * trkl, "ce": tce, "rkl": trkl}


# ------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("k", [0.0, 1.0, 4.0, 25.0])
def test_mix_weight_matches_numpy_float64(k):
    s, t, _ = logits(0)
    got = mix_weight(s, t, k)
    assert got.dtype == torch.float64 and not got.requires_grad
    np.testing.assert_allclose(got.numpy(), np_mix_weight(s.numpy(), t.numpy(), k),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("T,k,weights", [(4.0, 4.0, (1.0, 1.0, 1.0, 1.0)),
                                         (1.0, 10.0, (0.5, 2.0, 1.0, 0.3))])
def test_student_and_teacher_losses_match_numpy_float64(T, k, weights):
    s, t, y = logits(1)
    obj = BDKD(temperature=T, sharpness=k, ce_weight=weights[0], kd_weight=weights[1],
               teacher_ce_weight=weights[2], teacher_rkl_weight=weights[3])
    want_s, want_t = np_bdkd(s.numpy(), t.numpy(), y.numpy(), T, k, *weights)
    got_s, got_t = obj(s, t, y), obj.teacher_terms(t, s, y)
    for got, want in ((got_s, want_s), (got_t, want_t)):
        for name, v in want.items():
            assert float(got[name]) == pytest.approx(float(v), rel=1e-10, abs=1e-12), name


def test_overconfident_student_gets_more_forward_kl():
    flat = torch.zeros(1, NC, dtype=torch.float64)
    sharp = torch.tensor([[8.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    assert float(mix_weight(sharp, flat, 4.0)) > 0.9    # H_s < H_t: mostly KL(p_t ‖ p_s)
    assert float(mix_weight(flat, sharp, 4.0)) < 0.1    # H_s > H_t: mostly KL(p_s ‖ p_t)
    assert float(mix_weight(sharp, sharp, 4.0)) == pytest.approx(0.5)
    assert float(mix_weight(sharp, flat, 0.0)) == pytest.approx(0.5)  # sharpness 0: fixed mix
    # and the mixed term really is the forward KL at w → 1
    obj = BDKD(temperature=1.0, sharpness=1e6)
    terms = obj(sharp, flat, torch.tensor([0]))
    assert float(terms["kd"]) == pytest.approx(float(terms["forward_kl"]), rel=1e-9)


def test_no_gradient_crosses_between_the_networks():
    s0, t0, y = logits(2)
    obj = BDKD()
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    obj.teacher_terms(t, s, y)["loss"].backward()   # the teacher's reverse-KL regulariser
    assert s.grad is None and t.grad is not None and t.grad.abs().sum() > 0
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    obj(s, t, y)["loss"].backward()                 # the student's loss
    assert t.grad is None and s.grad.abs().sum() > 0


def test_bad_options_are_user_errors():
    with pytest.raises(UserError):
        BDKD(temperature=0)
    with pytest.raises(UserError):
        BDKD(sharpness=-1)


def test_a_teacher_checkpoint_or_no_teacher_is_refused(tmp_path, digits_teacher):
    with pytest.raises(UserError) as info:
        run(make_cfg(ONLINE + [f"teacher.checkpoint={digits_teacher}"]), tmp_path / "a",
            tty=False)
    assert info.value.key == "teacher.checkpoint"
    with pytest.raises(UserError) as info:
        run(make_cfg(DIGITS + ["student=mlp", "loss=bdkd"]), tmp_path / "b", tty=False)
    assert info.value.key == "teacher"
    assert not (tmp_path / "a" / "checkpoints").exists()


# ------------------------------------------------------------------------------ end to end
def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_online_run_trains_the_teacher_and_reports_both_networks(tmp_path):
    run_dir = tmp_path / "bdkd"
    cfg = make_cfg(ONLINE)
    summary = run(cfg, run_dir, tty=False)
    assert summary["status"] == "finished" and summary["teacher/source"] == "online"
    for key in ("best/test/acc1", "best/test/ece", "teacher/test/acc1", "teacher/test/ece"):
        assert 0 <= summary[key] <= 100, key
    assert summary["teacher/test/acc1"] > 50 and summary["best/test/acc1"] > 50  # chance: 10
    rows = read_metrics(run_dir)
    for key in ("val/teacher_acc1", "val/teacher_ece", "train/teacher_ce", "train/teacher_rkl",
                "train/mix_weight", "train/forward_kl", "train/reverse_kl", "val/agreement"):
        assert key in rows[0], key
    assert all(0 < r["train/mix_weight"] < 1 for r in rows)
    assert rows[1]["val/teacher_acc1"] != rows[0]["val/teacher_acc1"]
    # the teacher's weights moved away from its fresh initialisation, and are in the checkpoint
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    fresh, _ = online_teacher(cfg.teacher, build_data(cfg.dataset), torch.device("cpu"))
    fresh = fresh.state_dict()
    assert ckpt["teacher_model"].keys() == fresh.keys()
    assert all(not torch.equal(ckpt["teacher_model"][k], fresh[k]) for k in fresh
               if fresh[k].is_floating_point())
    assert {"teacher_optimizer", "teacher_scheduler"} <= set(ckpt)
    # its optimizer really stepped (SGD momentum buffers exist)
    assert ckpt["teacher_optimizer"]["state"]


def test_teacher_optimizer_defaults_to_the_run_optimizer_and_can_be_replaced():
    cfg = make_cfg(ONLINE + ["optimizer.lr=0.01"])
    assert cfg.loss.teacher_optimizer.lr == 0.01
    cfg = make_cfg(ONLINE + ["loss.teacher_optimizer={_target_: torch.optim.SGD, "
                             "_partial_: true, lr: 0.2}"])
    assert cfg.loss.teacher_optimizer.lr == 0.2 and cfg.optimizer.lr == 0.05
    assert isinstance(build_objective(cfg.loss), BDKD)   # launcher-only keys are not passed


@pytest.mark.parametrize("stop_at", [7])   # mid-epoch 1 (20 steps per epoch)
def test_stopped_and_resumed_online_run_matches_uninterrupted(tmp_path, stop_at):
    base = ONLINE + ["scheduler=cosine", "loss.teacher_scheduler={_target_: "
                     "distill_cli.schedules.cosine, _partial_: true, warmup_epochs: 1}"]
    full = tmp_path / "full"
    run(make_cfg(base), full, tty=False)
    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + [f"trainer.stop_at_step={stop_at}"]), parted, tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)

    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "teacher_model"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for part in ("optimizer", "teacher_optimizer"):
        for i, state in a[part]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[part]["state"][i][k]), (part, i, k)
    assert a["teacher_scheduler"] == b["teacher_scheduler"]
    assert a["scheduler"] == b["scheduler"]
    strip = lambda rows: [{k: v for k, v in r.items() if "images_per_s" not in k} for r in rows]
    assert strip(read_metrics(full)) == strip(read_metrics(parted))
