"""The Denoiser's parameterisation conversions (distill_cli/models/diffusion/denoiser.py).

The backbones here are real nn.Modules that return the EXACT parameterisation-space output for a
known (x, eps) — written in this file from the papers' formulas — and check the input the
Denoiser feeds them; the thing under test is the Denoiser's conversion (float64 throughout)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.diffusion.denoiser import PARAMS, Denoiser
from distill_cli.models.diffusion.noise import PROCESSES, build_process

D = torch.float64
SD = 0.5  # sigma_data


def pairs():
    for proc in PROCESSES:
        for param in PARAMS:
            if proc == "flow" and param in ("eps", "edm", "consistency"):
                continue          # refused (test_flow_refuses_params_that_divide_by_a)
            yield proc, param


def col(v):
    return v.view(-1, 1, 1, 1)


def scalings(sigma, sigma_min=None):
    """EDM (Karras et al. 2022, Table 1) / CM boundary-condition scalings, written here."""
    c_in = 1 / torch.sqrt(sigma ** 2 + SD ** 2)
    if sigma_min is None:
        c_skip = SD ** 2 / (sigma ** 2 + SD ** 2)
        c_out = sigma * SD / torch.sqrt(sigma ** 2 + SD ** 2)
    else:
        c_skip = SD ** 2 / ((sigma - sigma_min) ** 2 + SD ** 2)
        c_out = (sigma - sigma_min) * SD / torch.sqrt(sigma ** 2 + SD ** 2)
    return c_in, c_skip, c_out


def param_output(proc, param, x, eps, t):
    """(raw output, expected net input, expected net time) for clean x, noise eps at t."""
    a, s = col(proc.a(t)), col(proc.s(t))
    z = a * x + s * eps
    if param in ("eps", "x0", "v", "velocity"):
        out = {"eps": eps, "x0": x, "v": a * eps - s * x,
               "velocity": col(proc.da(t)) * x + col(proc.ds(t)) * eps}[param]
        return out, z, 1000 * t
    sigma = proc.s(t) / proc.a(t)
    smin = float(proc.s(proc.t_min) / proc.a(proc.t_min)) if param == "consistency" else None
    c_in, c_skip, c_out = (col(c) for c in scalings(sigma, smin))
    x_sigma = x + col(sigma) * eps
    return (x - c_skip * x_sigma) / c_out, c_in * x_sigma, torch.log(sigma) / 4


class Oracle(nn.Module):
    """Returns `out_cond` (rows with a real label or y=None) / `out_null` (null-label rows),
    and checks the input and time it receives. Records every call's batch size and y."""

    def __init__(self, out_cond, x_in=None, time=None, out_null=None, null=None):
        super().__init__()
        self.out_cond, self.out_null, self.null = out_cond, out_null, null
        self.x_in, self.time = x_in, time
        self.calls = []
        self.out = nn.Identity()

    def forward(self, x_in, time, y):
        self.calls.append((x_in.shape[0], None if y is None else y.clone()))
        n = self.out_cond.shape[0]
        if self.x_in is not None:
            torch.testing.assert_close(x_in[:n], self.x_in, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(time[:n], self.time, rtol=1e-12, atol=1e-12)
        if y is None or self.out_null is None:
            return self.out_cond.repeat(x_in.shape[0] // n, 1, 1, 1)
        rows = torch.cat([self.out_cond] * (x_in.shape[0] // n))
        nulls = torch.cat([self.out_null] * (x_in.shape[0] // n))
        return torch.where(col(y == self.null), nulls, rows)


def data(proc, seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 2, 3, 3, generator=g, dtype=D) * 2 - 1
    eps = torch.randn(b, 2, 3, 3, generator=g, dtype=D)
    t = proc.t_min + (proc.t_max - proc.t_min) * torch.linspace(0.05, 0.95, b, dtype=D)
    return x, eps, t


@pytest.mark.parametrize("proc_name,param", list(pairs()))
def test_predict_recovers_x_and_eps_for_every_param(proc_name, param):
    proc = build_process(proc_name)
    x, eps, t = data(proc)
    out, x_in, time = param_output(proc, param, x, eps, t)
    net = Oracle(out, x_in, time)
    model = Denoiser(net, process=proc_name, param=param, num_classes=0, conditional=False,
                     sigma_data=SD)
    z = col(proc.a(t)) * x + col(proc.s(t)) * eps
    torch.testing.assert_close(model(z, t), out, rtol=0, atol=0)
    x_hat, eps_hat = model.predict(z, t)
    torch.testing.assert_close(x_hat, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(model.target(x, eps, t), out, rtol=1e-10, atol=1e-10)
    # the PF-ODE velocity: d/dt (a x + s eps) for the fixed pair
    vel = col(proc.da(t)) * x + col(proc.ds(t)) * eps
    torch.testing.assert_close(model.velocity(z, t), vel, rtol=1e-9, atol=1e-9)
    assert all(y is None for _, y in net.calls)       # unconditional: never a label


def test_a_python_float_time_broadcasts():
    proc = build_process("vp_cosine")
    x, eps, _ = data(proc)
    t = torch.full((5,), 0.3, dtype=D)
    out, x_in, time = param_output(proc, "v", x, eps, t)
    model = Denoiser(Oracle(out, x_in, time), process="vp_cosine", param="v", num_classes=0,
                     conditional=False)
    x_hat, _ = model.predict(x_in, 0.3)
    torch.testing.assert_close(x_hat, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_classifier_free_guidance(w):
    proc = build_process("vp_cosine")
    x_c, eps, t = data(proc, seed=1)
    x_u = torch.zeros_like(x_c) + 0.25
    net = Oracle(x_c, out_null=x_u, null=10)
    model = Denoiser(net, process=proc, param="x0", num_classes=10, conditional=True,
                     guidance=w)
    assert model.null_label == 10
    z = col(proc.a(t)) * x_c + col(proc.s(t)) * eps
    y = torch.tensor([0, 3, 9, 1, 2])
    x_hat, eps_hat = model.predict(z, t, y)
    torch.testing.assert_close(x_hat, x_u + w * (x_c - x_u), rtol=1e-12, atol=1e-12)
    eps_of = lambda xx: (z - col(proc.a(t)) * xx) / col(proc.s(t))
    torch.testing.assert_close(eps_hat, eps_of(x_u) + w * (eps_of(x_c) - eps_of(x_u)),
                               rtol=1e-9, atol=1e-9)
    rows, labels = net.calls[-1]
    if w == 1.0:          # the conditional model, one call of B rows
        assert rows == 5 and labels.tolist() == y.tolist()
    else:                 # one batched call: the labels, then the null label
        assert rows == 10 and labels.tolist() == y.tolist() + [10] * 5
    # guidance= overrides the model's own; y=None runs the null label
    torch.testing.assert_close(model.predict(z, t, y, guidance=1.0)[0], x_c)
    torch.testing.assert_close(model.predict(z, t)[0], x_u)
    assert net.calls[-1][1].tolist() == [10] * 5


def test_guidance_is_ignored_by_an_unconditional_model():
    proc = build_process("vp_cosine")
    x, eps, t = data(proc)
    net = Oracle(x)
    model = Denoiser(net, process=proc, param="x0", num_classes=10, conditional=False,
                     guidance=4.0)
    z = col(proc.a(t)) * x + col(proc.s(t)) * eps
    torch.testing.assert_close(model.predict(z, t, torch.arange(5))[0], x)
    assert net.calls[-1] == (5, None)


@pytest.mark.parametrize("proc_name", ["vp_cosine", "vp_linear", "edm"])
def test_consistency_param_is_the_identity_at_t_min(proc_name):
    proc = build_process(proc_name)
    g = torch.Generator().manual_seed(2)
    anything = torch.randn(4, 2, 3, 3, generator=g, dtype=D) * 5
    model = Denoiser(Oracle(anything), process=proc, param="consistency", num_classes=0,
                     conditional=False)
    z = torch.randn(4, 2, 3, 3, generator=g, dtype=D)
    x_hat, _ = model.predict(z, proc.t_min)
    assert torch.equal(x_hat, z / proc.a(torch.tensor(proc.t_min, dtype=D)))
    # the plain edm param is not (c_skip < 1 at sigma_min)
    edm = Denoiser(Oracle(anything), process=proc, param="edm", num_classes=0,
                   conditional=False)
    assert not torch.allclose(edm.predict(z, proc.t_min)[0], x_hat)


class GaussianPosterior(nn.Module):
    """x ~ N(mu, v) per pixel: the exact E[x | z_t] in ANY parameterisation's output, computed
    from the VE form E[x | x_sigma] = mu + v (x_sigma - mu)/(v + sigma^2)."""

    def __init__(self, proc, param, mu=0.3, v=0.2):
        super().__init__()
        self.proc, self.param, self.mu, self.v = proc, param, mu, v
        self.out = nn.Identity()

    def forward(self, x_in, time, y):
        if self.param == "x0":
            t = time / 1000
            a, s = col(self.proc.a(t)), col(self.proc.s(t))
            return self.mu + a * self.v * (x_in - a * self.mu) / (a * a * self.v + s * s)
        sigma = col(torch.exp(4 * time))           # time = c_noise = log(sigma)/4
        _, c_skip, c_out = scalings(sigma)
        x_sigma = x_in * torch.sqrt(sigma ** 2 + SD ** 2)
        x_hat = self.mu + self.v * (x_sigma - self.mu) / (self.v + sigma ** 2)
        return (x_hat - c_skip * x_sigma) / c_out


@pytest.mark.parametrize("proc_name,param", [(p, q) for p in PROCESSES for q in ("x0", "edm")
                                             if not (p == "flow" and q == "edm")])
def test_x0_sigma_agrees_across_processes(proc_name, param):
    proc = build_process(proc_name)
    model = Denoiser(GaussianPosterior(proc, param), process=proc, param=param, num_classes=0,
                     conditional=False)
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=D)
    spread = col(torch.sqrt(0.2 + sigma ** 2))
    x_sigma = 0.3 + torch.randn(4, 1, 2, 2, generator=g, dtype=D) * spread
    expected = 0.3 + 0.2 * (x_sigma - 0.3) / (0.2 + col(sigma) ** 2)
    torch.testing.assert_close(model.x0_sigma(x_sigma, sigma), expected, rtol=1e-9, atol=1e-9)
    # a python float sigma broadcasts
    torch.testing.assert_close(model.x0_sigma(x_sigma, 0.3)[1], expected[1], rtol=1e-9,
                               atol=1e-9)


def test_set_diffusion_keeps_the_weights():
    net = nn.Conv2d(1, 1, 1)
    model = Denoiser(net, process="vp_cosine", param="v", num_classes=0, conditional=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_diffusion(process="edm", param="consistency", sampler="consistency", steps=2)
    assert (model.process.name, model.param, model.sampler, model.steps) == (
        "edm", "consistency", "consistency", 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError):
        model.set_diffusion(process="flow")          # consistency on flow: refused
    assert model.process.name == "edm"               # unchanged after the refusal


@pytest.mark.parametrize("proc,param,sampler", [
    ("flow", "velocity", "euler"), ("vp_cosine", "velocity", "euler"), ("flow", "x0", "euler"),
    ("edm", "edm", "heun"), ("vp_cosine", "edm", "heun"), ("edm", "eps", "heun"),
    ("edm", "consistency", "consistency"), ("vp_cosine", "v", "ddim"),
    ("vp_linear", "eps", "ddim"),
])
def test_auto_sampler(proc, param, sampler):
    model = Denoiser(nn.Identity(), process=proc, param=param, num_classes=0, conditional=False)
    assert model.resolved_sampler == sampler
    model.set_diffusion(sampler="ddpm")
    assert model.resolved_sampler == "ddpm"


def test_zoo_contract_paths():
    class Net(nn.Module):
        stages = ("down.0", "mid")
        feature_dim = 7

        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList([nn.Identity()])
            self.mid = nn.Identity()
            self.out = nn.Identity()

    model = Denoiser(Net(), process="vp_cosine", param="v", num_classes=0, conditional=False)
    assert model.stages == ("net.down.0", "net.mid") and model.feature_dim == 7
    assert model.classifier == "net.out"
    for path in (*model.stages, model.classifier):
        model.get_submodule(path)
    given = Denoiser(Net(), process="vp_cosine", param="v", num_classes=0, conditional=False,
                     stages=("mid",), feature_dim=3)
    assert given.stages == ("net.mid",) and given.feature_dim == 3


@pytest.mark.parametrize("kwargs,key", [
    ({"param": "score"}, "task.param"), ({"process": "ve"}, "task.process"),
    ({"sampler": "dpm++"}, "student.sampler"), ({"steps": 0}, "task.steps"),
    ({"steps": 2.5}, "task.steps"), ({"guidance": -1.0}, "task.guidance"),
    ({"guidance": math.nan}, "task.guidance"), ({"sigma_data": 0.0}, "student.sigma_data"),
    ({"process": "flow", "param": "eps"}, "task.param"),
    ({"process": "flow", "param": "edm"}, "task.param"),
    ({"conditional": True, "num_classes": 0}, "task.conditional"),
])
def test_bad_settings_are_user_errors(kwargs, key):
    args = {"process": "vp_cosine", "param": "v", "num_classes": 10, "conditional": False,
            **kwargs}
    with pytest.raises(UserError) as err:
        Denoiser(nn.Identity(), **args)
    assert err.value.key == key and err.value.fix
