"""PGD in [0, 1] pixel space (distill_cli/adversarial.py), the `eval.pgd` robust accuracy and
Madry adversarial training (`loss=adv_ce`): the attack's constraints at every step, its exact
sign-gradient fixed point on a linear model, that it raises the loss of a trained digits model,
leaves modes / parameter grads / the global RNG alone, determinism; AdversarialCE vs NumPy;
end-to-end runs (pgd_acc1 in the summary, a robust teacher trained by the teacher store)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.evaluation.adversarial import (NormalizedModel, as_number, pgd, pgd_settings,
                                     pixel_stats, robust_accuracy)
from distill_cli.config.build import build_data, build_model, build_objective
from distill_cli.tasks.classification.evaluate import predict, score
from distill_cli.errors import UserError
from distill_cli.training.run import run
from distill_cli.losses.adv_ce import AdversarialCE
from distill_cli.losses.base import StepObjective

from conftest import DIGITS, make_cfg

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture(scope="module")
def trained(digits_teacher):
    """(the trained digits resnet8, the digits DataBundle, a normalised test batch)."""
    cfg = make_cfg(DIGITS + ["student=resnet8"])
    data = build_data(cfg.dataset)
    model = build_model(cfg.student, "student", data)
    model.load_state_dict(torch.load(digits_teacher, weights_only=True)["model"])
    batch = next(iter(data.test.eval_batches(96)))
    return model, data, batch


def wrap(model, data):
    return NormalizedModel(model, data.train.mean, data.train.std)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------ NormalizedModel
def test_normalized_model_equals_model_on_normalised_inputs(trained):
    model, data, batch = trained
    model.eval()
    w = wrap(model, data)
    u = w.pixels(batch.x)
    mean = np.array(data.train.mean).reshape(1, -1, 1, 1)
    std = np.array(data.train.std).reshape(1, -1, 1, 1)
    # pixels() inverts the pipeline's normalisation: uint8/255 (digits is stored as uint8)
    np.testing.assert_allclose(u.numpy(), data.test.x[:96].numpy() / 255.0, atol=1e-6)
    np.testing.assert_allclose(w.normalize(u).numpy(), (u.double().numpy() - mean) / std,
                               atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(w(u), model(batch.x), atol=1e-5, rtol=1e-5)
    assert not any(k in w.state_dict() for k in ("mean", "std"))   # nothing to save


# ------------------------------------------------------------------------ pgd
@pytest.mark.parametrize("start", ["uniform", "normal_0.001", None])
def test_every_step_stays_in_the_eps_ball_and_in_01(trained, start):
    model, data, batch = trained
    w = wrap(model, data)
    x01 = w.pixels(batch.x)
    for steps in range(6):   # a seeded run of k steps is the k-th iterate of a longer one
        x = pgd(w, x01, batch.y, EPS, STEP, steps, start, gen(3))
        assert float((x - x01).abs().max()) <= EPS + 1e-6, steps
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, steps
        assert not x.requires_grad
    assert float((x - x01).abs().max()) > 0.9 * EPS   # it does use the budget


def test_linear_model_reaches_the_sign_gradient_corner():
    """Two-class linear model: ∇_u CE = p_other·(w_other − w_y), so every step moves along the
    fixed sign(w_other − w_y); with 3 steps of ε/2 the attack ends at the projected corner."""
    g = gen(1)
    lin = nn.Linear(12, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 12, generator=g))
        lin.weight[:, :2] = 0.0          # zero gradient: those pixels must not move
    model = nn.Sequential(nn.Flatten(), lin)
    x01 = torch.rand(5, 1, 3, 4, generator=g)
    x01[:, 0, 2, :2] = torch.tensor([0.0, 1.0])   # pixels on the box edges
    y = torch.tensor([0, 1, 0, 1, 1])
    eps = 0.1
    x = pgd(model, x01, y, eps, eps / 2, 3, None)
    W = lin.weight.detach().double().numpy()
    direction = np.sign(W[1 - y.numpy()] - W[y.numpy()]).reshape(5, 1, 3, 4)
    want = np.clip(x01.double().numpy() + eps * direction, 0.0, 1.0)
    np.testing.assert_allclose(x.double().numpy(), want, atol=1e-6)


def test_pgd_raises_the_loss_of_a_trained_model(trained):
    model, data, batch = trained
    model.eval()
    w = wrap(model, data)
    x01 = w.pixels(batch.x)
    x = pgd(w, x01, batch.y, EPS, STEP, 10, "uniform", gen(0))
    with torch.no_grad():
        clean, adv = F.cross_entropy(w(x01), batch.y), F.cross_entropy(w(x), batch.y)
        noise = x01 + (torch.rand(x01.shape, generator=gen(5)) * 2 - 1) * EPS
        rand = F.cross_entropy(w(noise.clamp(0, 1)), batch.y)
    # PGD well above clean and random noise of the same budget (2.1x and 1.98x on an AVX2
    # EPYC, where the trained model's bits differ; 1.5x leaves room for a CPU's numerics)
    assert float(adv) > 1.5 * float(clean) and float(adv) > 1.5 * float(rand)


def test_pgd_leaves_modes_grads_and_global_rng_alone(trained):
    model, data, batch = trained
    model.train()
    frozen = model.get_submodule(model.stages[0])
    frozen.eval()                                    # a mixed-mode model comes back mixed
    modes = {n: m.training for n, m in model.named_modules()}
    params = list(model.parameters())
    marker = torch.full_like(params[0], 7.0)
    params[0].grad = marker.clone()
    for p in params[1:]:
        p.grad = None
    bn = [(m, m.running_mean.clone()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    rng = torch.get_rng_state()
    w = wrap(model, data)
    pgd(w, w.pixels(batch.x), batch.y, EPS, STEP, 3, "uniform", gen(0))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(params[0].grad, marker) and all(p.grad is None for p in params[1:])
    assert all(torch.equal(m.running_mean, before) for m, before in bn)   # eval while attacking
    assert torch.equal(torch.get_rng_state(), rng)   # a generator's noise never the global RNG
    model.eval()


def test_pgd_is_deterministic_for_a_seeded_generator(trained):
    model, data, batch = trained
    w = wrap(model, data)
    x01 = w.pixels(batch.x)
    a = pgd(w, x01, batch.y, EPS, STEP, 2, "uniform", gen(11))
    b = pgd(w, x01, batch.y, EPS, STEP, 2, "uniform", gen(11))
    c = pgd(w, x01, batch.y, EPS, STEP, 2, "uniform", gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(4)
    d = pgd(w, x01, batch.y, EPS, STEP, 2, "normal_0.001")   # no generator: the global RNG
    torch.manual_seed(4)
    assert torch.equal(d, pgd(w, x01, batch.y, EPS, STEP, 2, "normal_0.001"))
    with pytest.raises(ValueError):
        pgd(w, x01, batch.y, EPS, STEP, 2, "gaussian")


# ------------------------------------------------------------------------ evaluation
def test_robust_accuracy(trained):
    model, data, _ = trained
    kw = {"eps": EPS, "step_size": 0.003, "batch_size": 50}
    rng = torch.get_rng_state()
    clean = score(*predict(model, data.test, 50, torch.device("cpu"), "32"))["acc1"]
    # no start and no step: exactly the clean accuracy
    assert robust_accuracy(model, data.test, steps=0, random_start=None, **kw) == \
        pytest.approx(clean)
    a = robust_accuracy(model, data.test, steps=5, seed=1, **kw)
    assert a == robust_accuracy(model, data.test, steps=5, seed=1, **kw)   # seeded
    assert a < clean - 1.0
    sub = robust_accuracy(model, data.test, steps=5, seed=1, max_samples=40, **kw)
    assert sub * 40 / 100 == pytest.approx(round(sub * 40 / 100))   # a count out of 40
    assert torch.equal(torch.get_rng_state(), rng)


def test_settings_and_user_errors():
    base = {"seed": 3, "batch_size": 100, "precision": "32"}
    assert pgd_settings({"steps": 0}, **base) is None
    assert pgd_settings(None, **base) is None
    got = pgd_settings({"steps": 20, "eps": "8/255", "step_size": 0.003, "max_samples": None,
                        "random_start": "uniform"}, **base)
    assert got == {"eps": 8 / 255, "step_size": 0.003, "steps": 20, "random_start": "uniform",
                   "max_samples": None, "seed": 3, "batch_size": 100, "precision": "32"}
    assert as_number("2/255", "k") == 2 / 255 and as_number(0.5, "k") == 0.5
    bad = [({"steps": -1}, "eval.pgd.steps"), ({"steps": 2, "eps": "x"}, "eval.pgd.eps"),
           ({"steps": 2, "eps": 0}, "eval.pgd.eps"),
           ({"steps": 2, "step_size": -1}, "eval.pgd.step_size"),
           ({"steps": 2, "max_samples": 0}, "eval.pgd.max_samples"),
           ({"steps": 2, "random_start": "gauss"}, "eval.pgd.random_start")]
    for node, key in bad:
        with pytest.raises(UserError) as err:
            pgd_settings(node, **base)
        assert err.value.key == key, node
    # only in-memory IMAGE splits have a [0, 1] pixel space
    for split in (SimpleNamespace(), SimpleNamespace(mean=(0.0,), std=(1.0,),
                                                     x=torch.zeros(2, 1, 40))):
        with pytest.raises(UserError) as err:
            pixel_stats(split, "eval.pgd")
        assert err.value.key == "eval.pgd"
    # the config default is off, with METHODS.md's PGD-20 settings ready
    assert pgd_settings(make_cfg([]).eval.pgd) is None
    on = pgd_settings(make_cfg(["eval.pgd.steps=20"]).eval.pgd)
    assert (on["eps"], on["step_size"], on["random_start"]) == (8 / 255, 0.003, "uniform")


# ------------------------------------------------------------------------ adv_ce
def np_ce(z, y):
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("adv_w,clean_w", [(1.0, 0.0), (0.5, 0.5), (0.7, 0.2)])
def test_adv_ce_matches_numpy(adv_w, clean_w):
    g = gen(2)
    adv, clean = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3, \
        torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    obj = AdversarialCE(adv_weight=adv_w, clean_weight=clean_w)
    got = obj(adv, None, y, clean_logits=clean)
    a, c = np_ce(adv.numpy(), y.numpy()), np_ce(clean.numpy(), y.numpy())
    assert float(got["loss"]) == pytest.approx(adv_w * a + clean_w * c, rel=1e-12)
    assert float(got["adv_ce"]) == pytest.approx(a, rel=1e-12)
    assert ("clean_ce" in got) == (clean_w > 0)


def test_adv_ce_config_and_errors():
    obj = build_objective(make_cfg(["loss=adv_ce"]).loss)
    assert isinstance(obj, StepObjective) and not obj.needs_teacher
    assert (obj.eps, obj.step_size, obj.steps, obj.random_start) == (8 / 255, 2 / 255, 10,
                                                                     "uniform")
    s, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])   # test_config's logit-only call
    assert torch.isfinite(obj(s, None, y)["loss"])
    for kw, key in (({"eps": "8/0"}, "loss.eps"), ({"steps": 1.5}, "loss.steps"),
                    ({"clean_weight": -1}, "loss.clean_weight"),
                    ({"random_start": "x"}, "loss.random_start")):
        with pytest.raises(UserError) as err:
            AdversarialCE(**kw)
        assert err.value.key == key


def train_mode_pgd(w, x01, y, steps):
    """An independent PGD (uniform start from the global RNG, as `pgd` draws it) on the model's
    TRAINING-mode graph: Madry's attack, BatchNorm on batch statistics."""
    lo, hi = (x01 - EPS).clamp(0, 1), (x01 + EPS).clamp(0, 1)
    x = torch.max(torch.min(x01 + (2 * torch.rand(x01.shape) - 1) * EPS, hi), lo)
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(w(x).float(), y), [x])
        x = torch.max(torch.min(x.detach() + STEP * grad.sign(), hi), lo)
    return x.detach()


@pytest.mark.parametrize("attack_bn", ["train", "eval"])
def test_adv_ce_step_trains_on_the_attack_of_the_model(trained, attack_bn):
    model, data, batch = trained
    obj = AdversarialCE(steps=3, attack_bn=attack_bn)
    obj.bind(model, None, data)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(9)
    terms = obj.step_terms(model, None, batch, None)
    assert model.training and set(terms) == {"loss", "adv_ce"}
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    # the same global-RNG draw by hand: CE of the model (train mode) on its own PGD examples,
    # from the same BatchNorm statistics (the training forward moved them)
    model.load_state_dict(before)
    torch.manual_seed(9)
    w = wrap(model, data)
    if attack_bn == "eval":   # ours: BatchNorm's running statistics while attacking
        x = pgd(w, w.pixels(batch.x), batch.y, EPS, STEP, 3, "uniform")
    else:                     # Madry: the training-mode graph
        x = train_mode_pgd(w, w.pixels(batch.x), batch.y, 3)
    with torch.no_grad():
        want = F.cross_entropy(w(x), batch.y)
    assert float(terms["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    model.load_state_dict(before)
    model.eval()


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_adv_ce_run_reports_pgd_accuracy(tmp_path):
    run_dir = tmp_path / "r"
    s = run(make_cfg(DIGITS + ["student=resnet8", "loss=adv_ce", "trainer.epochs=1",
                                "eval.pgd.steps=3"]), run_dir, tty=False)
    assert s["status"] == "finished" and s["best/test/acc1"] > 30.0
    for key in ("best/test/pgd_acc1", "last/test/pgd_acc1"):
        assert 0.0 <= s[key] <= 100.0
    assert s["best/test/pgd_acc1"] > 10.0     # above chance under attack, after one epoch
    rows = read_metrics(run_dir)
    assert "train/adv_ce" in rows[0] and "train/ce" not in rows[0]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["best/test/pgd_acc1"] == s["best/test/pgd_acc1"]


def test_teacher_store_trains_a_robust_teacher(tmp_path):
    """`teacher.train.loss` takes a loss NODE: the option group composes one into it."""
    cfg = make_cfg(DIGITS + ["student=mlp", "loss=ce", "trainer.epochs=1", "teacher=resnet8",
                             "teacher.train.epochs=1", "loss@teacher.train.loss=adv_ce",
                             "teacher.train.loss.steps=2"])
    s = run(cfg, tmp_path / "r", tty=False)
    assert s["status"] == "finished" and s["teacher/source"] == "store"
    from pathlib import Path
    rows = read_metrics(Path(s["teacher/store_dir"]))
    assert "train/adv_ce" in rows[0] and "train/ce" not in rows[0]
