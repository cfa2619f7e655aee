"""Samplers (distill_cli/models/diffusion/samplers.py) on GAUSSIAN data, whose denoiser is known
in closed form.

Data x ~ N(mu, v) per pixel. Then z_t = a x + s eps ~ N(a mu, a^2 v + s^2) and the exact
posterior mean is E[x | z_t] = mu + a v (z - a mu)/(a^2 v + s^2) — an "oracle" x0 backbone.
The probability-flow ODE transports N(a_T mu, a_T^2 v + s_T^2) onto every later marginal
monotonically per pixel, so it keeps the standardised value k = (z_t - a_t mu)/sqrt(a_t^2 v + s_t^2)
constant: z_t = a_t mu + sqrt(a_t^2 v + s_t^2) k (checked against the ODE by finite differences
below), and the model's x_hat there is mu + a_t v k / sqrt(a_t^2 v + s_t^2). A sampler with
n steps returns x_hat at its last evaluated time grid[n-1] (its move into t_min), so its exact
answer is that value at t = grid[n-1] (-> mu + sqrt(v) k as n grows)."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.diffusion import samplers
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.noise import PROCESSES, build_process

D = torch.float64
MU = torch.tensor([0.3, -0.5, 0.0, 0.8], dtype=D).view(1, 1, 2, 2)
V = torch.tensor([0.2, 0.05, 0.5, 0.1], dtype=D).view(1, 1, 2, 2)


def col(x):
    return x.reshape(-1, 1, 1, 1)


class Posterior(nn.Module):
    """The exact E[x | z_t] for Gaussian data, as an x0 backbone (input z, time 1000 t).
    Counts its rows (network evaluations x batch)."""

    def __init__(self, proc, mu=MU, v=V):
        super().__init__()
        self.proc, self.mu, self.v = proc, mu, v
        self.calls = 0
        self.out = nn.Identity()

    def forward(self, z, time, y):
        self.calls += 1
        t = time.double() / 1000
        a, s = col(self.proc.a(t)).to(z.dtype), col(self.proc.s(t)).to(z.dtype)
        mu, v = self.mu.to(z.dtype), self.v.to(z.dtype)
        return mu + a * v * (z - a * mu) / (a * a * v + s * s)


def oracle(name, **kw):
    proc = build_process(name)
    return Denoiser(Posterior(proc, **kw), process=proc, param="x0", num_classes=0,
                    conditional=False)


def noise(n=64, seed=0, dtype=D):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def standardised(proc, z_t_max):
    a, s = float(proc.a(proc.t_max)), float(proc.s(proc.t_max))
    return (z_t_max - a * MU) / torch.sqrt(a * a * V + s * s)


def exact_z(proc, k, t):
    a, s = float(proc.a(t)), float(proc.s(t))
    return a * MU + (a * a * V + s * s).sqrt() * k


def exact_x_hat(proc, k, t):
    a, s = float(proc.a(t)), float(proc.s(t))
    return MU + a * V * k / (a * a * V + s * s).sqrt()


def sampler_error(model, method, n, eps):
    proc = model.process
    k = standardised(proc, float(proc.s(proc.t_max)) * eps)
    x = samplers.sample(model, eps, steps=n, method=method, clip=False)
    return float((x - exact_x_hat(proc, k, float(proc.grid(n)[n - 1]))).abs().max())


@pytest.mark.parametrize("name", PROCESSES)
def test_the_closed_form_flow_map_solves_the_pf_ode(name):
    """dz/dt of z_t = a mu + sqrt(a^2 v + s^2) k equals a' x_hat + s' eps_hat at z_t (float64
    finite differences), with x_hat the posterior mean and eps_hat = (z - a x_hat)/s."""
    proc = build_process(name)
    k = noise(8)
    h = 1e-6
    for t in torch.linspace(proc.t_min, proc.t_max, 12, dtype=D)[1:-1].tolist():
        dz = (exact_z(proc, k, t + h) - exact_z(proc, k, t - h)) / (2 * h)
        z = exact_z(proc, k, t)
        a, s = float(proc.a(t)), float(proc.s(t))
        x_hat = MU + a * V * (z - a * MU) / (a * a * V + s * s)
        eps_hat = (z - a * x_hat) / s
        ode = float(proc.da(t)) * x_hat + float(proc.ds(t)) * eps_hat
        torch.testing.assert_close(dz, ode, rtol=1e-6, atol=1e-6)


# (process, tolerance of Heun with 256 steps: second order, EDM's rho-warped grid is coarser
# where this 4-pixel Gaussian's curvature is)
HEUN_TOL = {"flow": 1e-4, "vp_cosine": 2e-4, "vp_linear": 5e-4, "edm": 3e-3}


@pytest.mark.parametrize("name", PROCESSES)
def test_heun_reproduces_the_analytic_ode_map(name):
    model, eps = oracle(name), noise()
    e128, e256 = (sampler_error(model, "heun", n, eps) for n in (128, 256))
    assert e256 < HEUN_TOL[name]
    assert e128 / e256 > 3.3                        # second order: ~4x per halving
    # and toward the data end itself (mu + sqrt(v) k, up to sigma(t_min)^2 / v)
    if name != "vp_linear":                         # its t_min = 1e-3 has sigma = 0.01
        k = standardised(model.process, float(model.process.s(1.0)) * eps)
        x = samplers.sample(model, eps, steps=256, method="heun", clip=False)
        torch.testing.assert_close(x, MU + V.sqrt() * k, rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", PROCESSES)
def test_heun_steps_reach_the_ode_endpoint_at_t_min(name):
    """`step` all the way INTO t_min (flow: s(0) = 0, the last step is Euler, as EDM's)."""
    model, eps = oracle(name), noise()
    proc = model.process
    grid = proc.grid(256).tolist()
    z = float(proc.s(grid[0])) * eps
    k = standardised(proc, z)
    for t, u in pairwise(grid):
        z = samplers.step(model, z, t, u, method="heun")
    torch.testing.assert_close(z, exact_z(proc, k, proc.t_min), rtol=0, atol=HEUN_TOL[name])


@pytest.mark.parametrize("name", PROCESSES)
def test_ddim_converges_to_the_same_map_and_is_exact_for_a_point_mass(name):
    model, eps = oracle(name), noise()
    e256, e512 = (sampler_error(model, "ddim", n, eps) for n in (256, 512))
    assert e512 < (2e-2 if name == "edm" else 1e-2) and 1.8 < e256 / e512 < 2.2   # 1st order
    # DDIM's step is exact when x_hat is constant (all data at one point, v = 0)
    point = oracle(name, v=torch.zeros_like(V))
    for n in (1, 3):
        x = samplers.sample(point, eps, steps=n, method="ddim", clip=False)
        torch.testing.assert_close(x, MU.expand_as(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,n", [("flow", 32), ("edm", 64), ("vp_cosine", 256),
                                    ("vp_linear", 512)])
def test_euler_converges_at_first_order(name, n):
    model, eps = oracle(name), noise()
    coarse, fine = sampler_error(model, "euler", n, eps), sampler_error(model, "euler", 2 * n, eps)
    assert 1.75 < coarse / fine < 2.25


def test_ddim_and_euler_coincide_on_the_linear_interpolant():
    model, eps = oracle("flow"), noise()
    torch.testing.assert_close(samplers.sample(model, eps, steps=5, method="ddim", clip=False),
                               samplers.sample(model, eps, steps=5, method="euler", clip=False))


@pytest.mark.parametrize("name", PROCESSES)
def test_ddpm_ancestral_samples_have_the_data_statistics(name):
    model, n = oracle(name), 8000
    x = samplers.sample(model, noise(n, seed=5), steps=1000, method="ddpm", clip=False,
                        generator=torch.Generator().manual_seed(6))
    mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
    assert bool(((mean - MU).abs() < 4 * (V / n).sqrt()).all()), (mean - MU).flatten()
    assert bool(((var / V - 1).abs() < 0.08).all()), (var / V).flatten()


@pytest.mark.parametrize("method", ["ddpm", "consistency"])
def test_stochastic_samplers_are_deterministic_for_a_generator(method):
    model, eps = oracle("edm"), noise(16)
    run = lambda seed: samplers.sample(model, eps, steps=4, method=method,
                                       generator=torch.Generator().manual_seed(seed))
    state = torch.get_rng_state()
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(state, torch.get_rng_state())          # the global RNG is untouched
    with pytest.raises(ValueError, match="Generator"):
        samplers.sample(model, eps, steps=4, method=method)


@pytest.mark.parametrize("method", ["ddim", "euler", "heun"])
def test_deterministic_samplers_ignore_the_generator(method):
    model, eps = oracle("vp_cosine"), noise(16)
    a = samplers.sample(model, eps, steps=3, method=method)
    b = samplers.sample(model, eps, steps=3, method=method,
                        generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method,steps,evals", [
    ("ddim", 4, 4), ("euler", 4, 4), ("ddpm", 4, 4), ("heun", 4, 7), ("heun", 1, 1),
    ("consistency", 3, 3), ("onestep", 1, 1),
])
def test_network_evaluations(method, steps, evals):
    model = oracle("edm")
    samplers.sample(model, noise(4), steps=steps, method=method,
                    generator=torch.Generator().manual_seed(0))
    assert model.net.calls == evals


def test_onestep_is_the_prediction_at_t_max():
    model, eps = oracle("vp_cosine"), noise(8)
    x = samplers.sample(model, eps, steps=1, method="onestep", clip=False)
    z = samplers.initial_noise(model.process, eps)
    torch.testing.assert_close(z, float(model.process.s(1.0)) * eps)
    torch.testing.assert_close(x, model.predict(z, 1.0)[0])
    with pytest.raises(UserError) as err:
        samplers.sample(model, eps, steps=2, method="onestep")
    assert err.value.key == "task.steps"


class ConsistencyOracle(nn.Module):
    """The exact consistency function of Gaussian data on edm (x -> its ODE endpoint at
    sigma_min), as the F of the boundary-condition parameterisation (sigma_data 0.5)."""

    def forward(self, x_in, c_noise, y):
        sigma = col(torch.exp(4 * c_noise.double()))
        x_sigma = x_in * (sigma ** 2 + 0.25).sqrt()
        smin = 0.002
        f = MU + ((V + smin ** 2) / (V + sigma ** 2)).sqrt() * (x_sigma - MU)
        c_skip = 0.25 / ((sigma - smin) ** 2 + 0.25)
        c_out = (sigma - smin) * 0.5 / (sigma ** 2 + 0.25).sqrt()
        return (f - c_skip * x_sigma) / c_out


def test_consistency_sampler_with_the_exact_consistency_function():
    model = Denoiser(ConsistencyOracle(), process="edm", param="consistency", num_classes=0,
                     conditional=False)
    assert model.resolved_sampler == "consistency"
    eps = noise(4000, seed=3)
    k = standardised(model.process, 80.0 * eps)
    one = samplers.sample(model, eps, steps=1, method="consistency", clip=False,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, exact_z(model.process, k, 0.0), rtol=0, atol=1e-9)
    multi = samplers.sample(model, eps, steps=4, method="consistency", clip=False,
                            generator=torch.Generator().manual_seed(0))
    n = eps.shape[0]
    assert bool(((multi.mean(0) - MU).abs() < 4 * (V / n).sqrt()).all())
    assert bool(((multi.var(0) / V - 1).abs() < 0.1).all())
    assert not torch.allclose(multi, one)                  # fresh noise at every step


def test_ddim_with_clipping_is_pds_sampler():
    """PD's ddim_step with eval_clip_denoised (METHODS_FAMILIES.md A1), written out: t = (i+1)/N,
    s = i/N; clip x_hat, eps_hat = (z - a x_hat)/s; z_s = a_s x_hat + s_s eps_hat; the last step
    returns x_hat."""
    mu, v = torch.full_like(MU, 1.5), torch.full_like(V, 0.5)      # mass outside [-1, 1]
    model = oracle("vp_cosine", mu=mu, v=v)
    proc, eps, n = model.process, noise(32), 4
    got = samplers.sample(model, eps, steps=n, method="ddim")
    z = eps.clone()
    z = float(proc.s(1.0)) * z
    for i in reversed(range(n)):
        t, s = (i + 1) / n, i / n
        a_t, s_t = float(proc.a(t)), float(proc.s(t))
        x_hat = (mu + a_t * v * (z - a_t * mu) / (a_t ** 2 * v + s_t ** 2)).clamp(-1, 1)
        if i == 0:
            break
        eps_hat = (z - a_t * x_hat) / s_t
        z = float(proc.a(s)) * x_hat + float(proc.s(s)) * eps_hat
    torch.testing.assert_close(got, x_hat, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, samplers.sample(model, eps, steps=n, method="ddim",
                                                   clip=False).clamp(-1, 1))


def test_step_accepts_per_example_times():
    model, eps = oracle("vp_cosine"), noise(3)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=D)
    u = torch.tensor([0.7, 0.45, 0.0], dtype=D)
    for method in ("ddim", "euler", "heun"):
        batched = samplers.step(model, eps, t, u, method=method)
        rows = [samplers.step(model, eps[i:i + 1], float(t[i]), float(u[i]), method=method)
                for i in range(3)]
        torch.testing.assert_close(batched, torch.cat(rows), rtol=1e-12, atol=1e-12)


def test_guidance_reaches_the_model():
    proc = build_process("vp_cosine")

    class TwoWay(nn.Module):
        def forward(self, z, time, y):
            return torch.where(col(y == 10), torch.zeros_like(z), torch.ones_like(z))

    model = Denoiser(TwoWay(), process=proc, param="x0", num_classes=10, conditional=True)
    y = torch.zeros(4, dtype=torch.long)
    for w, want in ((0.0, 0.0), (1.0, 1.0), (0.5, 0.5)):
        x = samplers.sample(model, noise(4), y, steps=1, method="onestep", guidance=w)
        torch.testing.assert_close(x, torch.full_like(x, want))


def test_custom_grid_float32_and_bad_arguments():
    model = oracle("flow")
    eps32 = noise(8, dtype=torch.float32)
    model.net.mu, model.net.v = MU.float(), V.float()
    x = samplers.sample(model, eps32, steps=2, method="euler",
                        grid=torch.tensor([1.0, 0.3, 0.0], dtype=D))
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    with pytest.raises(ValueError):
        samplers.sample(model, eps32, steps=3, method="euler", grid=torch.tensor([1.0, 0.0]))
    with pytest.raises(UserError) as err:
        samplers.sample(model, eps32, steps=2, method="dpm++")
    assert err.value.key == "student.sampler"
    with pytest.raises(UserError) as err:
        samplers.sample(model, eps32, steps=0, method="euler")
    assert err.value.key == "task.steps"
    # generate: the model's own sampler ("auto" -> euler on flow) and step count
    model.set_diffusion(steps=3)
    torch.testing.assert_close(model.generate(eps32),
                               samplers.sample(model, eps32, steps=3, method="euler"))
