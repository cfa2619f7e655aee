"""The diffusion teachers' objective (tasks/diffusion/methods/denoising.py; loss=dsm and
loss=flow_matching) against float64 references written here from the papers' formulas."""
from __future__ import annotations

import math
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli.data.bundle import Batch
from distill_cli.draws import SampleDraws
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.noise import build_process
from distill_cli.tasks.diffusion.methods.denoising import Denoising

D = torch.float64
CTX = StepContext(epoch=1, step=0, steps_per_epoch=1, total_steps=1)
CONF = Path(__file__).resolve().parents[1] / "distill_cli" / "conf" / "loss"


class Net(nn.Module):
    """A small real backbone: conv of the input + a time- and label-dependent bias."""

    def __init__(self, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.emb = nn.Embedding(classes + 1, 2)
        self.out = nn.Identity()
        self.seen = []

    def forward(self, x, time, y):
        self.seen.append(None if y is None else y.clone())
        h = self.conv(x) + torch.sin(time.to(x.dtype) * 0.01).view(-1, 1, 1, 1)
        if y is not None:
            h = h + self.emb(y).to(x.dtype).view(-1, 2, 1, 1)
        return h


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    return Batch(index=torch.arange(n), x=x, y=torch.randint(0, 10, (n,), generator=g))


def model(process, param, conditional=False):
    return Denoiser(Net(), process=process, param=param, num_classes=10, conditional=conditional)


def replay(obj: Denoising, b: Batch, ctx: StepContext = CTX) -> SampleDraws:
    """The objective's per-sample draws of step ctx.step, made again (its documented order)."""
    return SampleDraws(int(obj.noise_seed), ctx.step, b.index, "cpu")


@torch.no_grad()
def reference(m: Denoiser, b: Batch, weighting: str, draws: SampleDraws) -> float:
    """The loss in float64 from the same draws (u ~ U[0,1), then eps ~ N(0, I), per sample)."""
    proc = m.process
    u = draws.uniform()
    eps = draws.normal(*b.x.shape[1:]).double()
    x = b.x.double()
    t = proc.t_max - (proc.t_max - proc.t_min) * u
    t = t.float().double()                         # the objective's t is float32
    c = lambda v: v.view(-1, 1, 1, 1)
    a, s, da, ds = (c(f(t)) for f in (proc.a, proc.s, proc.da, proc.ds))
    z = a * x + s * eps
    net = m.net.double()
    sd = m.sigma_data
    if m.param in ("eps", "x0", "v", "velocity"):
        out = net(z, 1000 * t, None)
        x_hat = {"eps": (z - s * out) / a, "x0": out,
                 "v": (a * z - s * out) / (a * a + s * s),
                 "velocity": (ds * z - s * out) / (a * ds - s * da)}[m.param]
        target = {"eps": eps, "x0": x, "v": a * eps - s * x, "velocity": da * x + ds * eps}[m.param]
    else:                                          # Karras et al. 2022, Table 1
        sigma = s / a
        x_sigma = z / a
        c_in, c_skip = 1 / (sigma ** 2 + sd ** 2).sqrt(), sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        out = net(c_in * x_sigma, torch.log(sigma).flatten() / 4, None)
        x_hat = c_skip * x_sigma + c_out * out
        target = (x - c_skip * x_sigma) / c_out
    m.net.float()
    per_x = ((x_hat - x) ** 2).mean((1, 2, 3))
    snr = (a / s).flatten() ** 2
    if weighting == "uniform":
        return float(((out - target) ** 2).mean())
    if weighting == "snr_trunc":                   # PD: max(x_mse, eps_mse)
        eps_hat = (z - a * x_hat) / s
        per_eps = ((eps_hat - eps) ** 2).mean((1, 2, 3))
        torch.testing.assert_close(torch.maximum(per_x, per_eps),
                                   torch.clamp(snr, min=1) * per_x, rtol=1e-9, atol=0)
        return float(torch.maximum(per_x, per_eps).mean())
    lam = (sigma.flatten() ** 2 + sd ** 2) / (sigma.flatten() * sd) ** 2   # EDM lambda(sigma)
    return float((lam * per_x).mean())


@pytest.mark.parametrize("process,param,weighting", [
    ("vp_cosine", "v", "snr_trunc"), ("vp_cosine", "x0", "snr_trunc"),
    ("vp_linear", "eps", "snr_trunc"), ("vp_linear", "eps", "uniform"),
    ("vp_cosine", "v", "uniform"), ("edm", "edm", "edm"), ("edm", "edm", "uniform"),
    ("vp_cosine", "edm", "edm"), ("flow", "velocity", "uniform"), ("flow", "x0", "snr_trunc"),
])
def test_loss_matches_the_float64_reference(process, param, weighting):
    m, b = model(process, param), batch()
    obj = Denoising(weighting=weighting)
    torch.manual_seed(7)
    obj.bind(m, None, None)
    terms = obj.step_terms(m, None, b, CTX)
    assert set(terms) == {"loss", "mse_x", "mse"}
    want = reference(m, b, weighting, replay(obj, b))
    got = float(terms["loss"].detach())
    assert math.isclose(got, want, rel_tol=2e-5), (got, want)
    terms["loss"].backward()
    assert m.net.conv.weight.grad is not None and float(m.net.conv.weight.grad.abs().sum()) > 0


def test_edm_weighting_is_the_uniform_loss_on_f():
    """lambda(sigma) c_out^2 = 1: for the edm param the two weightings agree."""
    m, b = model("edm", "edm"), batch(n=32)
    losses = []
    for weighting in ("edm", "uniform"):   # unbound: both keep noise_seed 0, the same draws
        terms = Denoising(weighting=weighting).step_terms(m, None, b, CTX)
        losses.append(float(terms["loss"].detach()))
    assert math.isclose(*losses, rel_tol=1e-4)


def test_flow_matching_target_is_noise_minus_data():
    m, b = model("flow", "velocity"), batch()
    torch.manual_seed(0)
    u = torch.rand(6)
    eps = torch.randn(b.x.shape)
    t = 1.0 - u
    torch.testing.assert_close(m.target(b.x, eps, t), eps - b.x)


@pytest.mark.parametrize("process", ["edm", "vp_cosine", "flow"])
def test_lognormal_times_follow_edm(process):
    """ln sigma(t) ~ N(-1.2, 1.2^2), clamped to the process's range."""
    proc = build_process(process)
    obj = Denoising(time_sampling="lognormal")
    t = obj.sample_times(proc, SampleDraws(0, 0, torch.arange(20000), "cpu"))
    assert t.dtype == torch.float32
    assert float(t.min()) >= proc.t_min and float(t.max()) <= proc.t_max
    log_sigma = torch.log(proc.sigma(t.double()))
    assert abs(float(log_sigma.mean()) + 1.2) < 0.03 and abs(float(log_sigma.std()) - 1.2) < 0.03


def test_uniform_times_never_hit_the_data_end():
    proc = build_process("flow")
    t = Denoising().sample_times(proc, SampleDraws(0, 0, torch.arange(20000), "cpu"))
    assert float(t.min()) > 0 and float(t.max()) <= 1
    assert abs(float(t.mean()) - 0.5) < 0.01


def test_label_dropout_rate_and_null_label():
    m, n = model("vp_cosine", "v", conditional=True), 20000
    b = Batch(index=torch.arange(n), x=torch.zeros(n, 2, 4, 4),
              y=torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0)))
    Denoising(label_dropout=0.3).step_terms(m, None, b, CTX)
    seen = m.net.seen[-1]
    dropped = seen == m.null_label
    assert abs(float(dropped.float().mean()) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert torch.equal(seen[~dropped], b.y[~dropped])
    Denoising(label_dropout=0.0).step_terms(m, None, b, CTX)
    assert torch.equal(m.net.seen[-1], b.y)
    unconditional = model("vp_cosine", "v")
    Denoising(label_dropout=0.3).step_terms(unconditional, None, batch(), CTX)
    assert unconditional.net.seen[-1] is None


def test_draws_are_a_function_of_seed_step_and_sample_not_of_the_default_rng():
    """The loss of a step does not depend on the default RNG (which every torchrun rank seeds
    alike) but on the bound seed and the step; bind draws the seed from the default RNG."""
    m, b = model("vp_cosine", "v"), batch()
    obj = Denoising()
    torch.manual_seed(11)
    obj.bind(m, None, None)
    assert "noise_seed" in obj.state_dict() and list(obj.parameters()) == []
    torch.manual_seed(1)
    first = obj.step_terms(m, None, b, CTX)["loss"]
    torch.manual_seed(2)
    again = obj.step_terms(m, None, b, CTX)["loss"]
    later = obj.step_terms(m, None, b, StepContext(1, 1, 1, 2))["loss"]
    assert torch.equal(first, again) and not torch.equal(first, later)
    twin, other = Denoising(), Denoising()
    torch.manual_seed(11)
    twin.bind(m, None, None)
    torch.manual_seed(12)
    other.bind(m, None, None)
    assert int(twin.noise_seed) == int(obj.noise_seed) != int(other.noise_seed)
    assert not torch.equal(first, other.step_terms(m, None, b, CTX)["loss"])


def test_a_batch_split_in_slices_draws_what_the_whole_batch_draws():
    """What two torchrun ranks compute: each half of the global batch (its indices kept) gives
    the per-sample terms the whole batch gives, so the mean of the halves' losses is the
    batch's loss (label dropout included)."""
    m = model("vp_cosine", "v", conditional=True)
    b = batch(n=8)
    obj = Denoising(label_dropout=0.5)
    torch.manual_seed(0)
    obj.bind(m, None, None)
    whole = obj.step_terms(m, None, b, CTX)["loss"]
    seen_whole = m.net.seen[-1]
    halves, seen = [], []
    for part in (slice(0, 4), slice(4, 8)):
        halves.append(obj.step_terms(m, None, Batch(*(t[part] for t in b)), CTX)["loss"])
        seen.append(m.net.seen[-1])
    assert torch.equal(torch.cat(seen), seen_whole)          # the same labels dropped
    assert (seen_whole == m.null_label).any() and (seen_whole != m.null_label).any()
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-6, atol=0)


def test_a_loaded_state_continues_with_the_stored_seed():
    """Resume: load_state_dict replaces the seed bind drew (and the one a step cached)."""
    m, b = model("vp_cosine", "v"), batch()
    torch.manual_seed(3)
    obj = Denoising()
    obj.bind(m, None, None)
    want = obj.step_terms(m, None, b, CTX)["loss"]
    fresh = Denoising()
    torch.manual_seed(4)
    fresh.bind(m, None, None)
    assert not torch.equal(fresh.step_terms(m, None, b, CTX)["loss"], want)   # seed cached
    fresh.load_state_dict(obj.state_dict())
    assert torch.equal(fresh.step_terms(m, None, b, CTX)["loss"], want)


def test_objective_contract():
    obj = Denoising()
    assert obj.task_name == "diffusion" and obj.needs_teacher is False
    assert obj.batch_coupling is None and list(obj.parameters()) == []


@pytest.mark.parametrize("name,kind", [("dsm", "snr_trunc"), ("flow_matching", "uniform")])
def test_yamls_build_the_objective(name, kind):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    obj = hydra.utils.instantiate(cfg)
    assert isinstance(obj, Denoising) and obj.weighting == kind and obj.name == name
    if name == "flow_matching":
        obj.bind(model("flow", "velocity"), None, None)          # accepted
        with pytest.raises(UserError) as err:
            obj.bind(model("vp_cosine", "velocity"), None, None)
        assert err.value.key == "student.process" and "task.process=flow" in err.value.fix
        with pytest.raises(UserError) as err:
            obj.bind(model("flow", "v"), None, None)
        assert err.value.key == "student.param" and "task.param=velocity" in err.value.fix
    else:
        obj.bind(model("edm", "eps"), None, None)                # dsm takes any model


@pytest.mark.parametrize("kwargs,key", [
    ({"weighting": "snr"}, "loss.weighting"), ({"time_sampling": "beta"}, "loss.time_sampling"),
    ({"label_dropout": 1.0}, "loss.label_dropout"), ({"label_dropout": -0.1}, "loss.label_dropout"),
    ({"p_std": 0.0}, "loss.p_std"), ({"p_mean": math.inf}, "loss.p_std"),
])
def test_bad_settings_are_user_errors(kwargs, key):
    with pytest.raises(UserError) as err:
        Denoising(**kwargs)
    assert err.value.key == key and err.value.fix


def test_a_classifier_student_is_a_user_error():
    with pytest.raises(UserError) as err:
        Denoising().bind(nn.Linear(4, 10), None, None)
    assert err.value.key == "student" and "task=diffusion" in err.value.fix


def test_conditional_model_needs_integer_labels():
    m = model("vp_cosine", "v", conditional=True)
    b = batch()
    soft = Batch(index=b.index, x=b.x, y=torch.full((6, 10), 0.1))
    with pytest.raises(UserError) as err:
        Denoising().step_terms(m, None, soft, CTX)
    assert err.value.key == "task.conditional"
