"""Noise processes (distill_cli/models/diffusion/noise.py) against float64 formulas written here
from the papers (PD's log-SNR cosine, the VP-SDE, EDM's sigma(t), the linear interpolant)."""
from __future__ import annotations

import math

import pytest
import torch

from distill_cli.errors import UserError
from distill_cli.models.diffusion.noise import PROCESSES, build_process

D = torch.float64


def ref_vp_cosine(t):
    """PD schedules.py: logsnr = -2 log tan(a t + b); alpha^2 = sigmoid(logsnr)."""
    b = math.atan(math.exp(-20 / 2))
    a_c = math.atan(math.exp(20 / 2)) - b
    lam = -2 * torch.log(torch.tan(a_c * t + b))
    return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))


def ref_vp_linear(t):
    a = torch.exp(-0.25 * t ** 2 * (20 - 0.1) - 0.5 * t * 0.1)
    return a, torch.sqrt(1 - a ** 2)


def ref_edm(t):
    s = (0.002 ** (1 / 7) + t * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    return torch.ones_like(t), s


def ref_flow(t):
    return 1 - t, t.clone()


REFS = {"vp_cosine": ref_vp_cosine, "vp_linear": ref_vp_linear, "edm": ref_edm,
        "flow": ref_flow}


def interior(p, n=41):
    """times strictly inside (t_min, t_max)."""
    return torch.linspace(p.t_min, p.t_max, n + 2, dtype=D)[1:-1]


@pytest.mark.parametrize("name", PROCESSES)
def test_a_and_s_match_the_papers_formulas(name):
    p = build_process(name)
    t = torch.linspace(p.t_min, p.t_max, 51, dtype=D)
    a, s = REFS[name](t)
    assert p.name == name
    torch.testing.assert_close(p.a(t), a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.s(t), s, rtol=1e-10, atol=1e-12)
    assert p.a(t).dtype == D


@pytest.mark.parametrize("name", ["vp_cosine", "vp_linear"])
def test_vp_processes_preserve_variance(name):
    p = build_process(name)
    t = torch.linspace(p.t_min, p.t_max, 101, dtype=D)
    torch.testing.assert_close(p.a(t) ** 2 + p.s(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


def test_cosine_logsnr_endpoints_and_ranges():
    p = build_process("vp_cosine")
    ends = p.logsnr(torch.tensor([0.0, 1.0], dtype=D))
    torch.testing.assert_close(ends, torch.tensor([20.0, -20.0], dtype=D), rtol=0, atol=1e-9)
    assert (p.t_min, p.t_max) == (0.0, 1.0)
    assert build_process("vp_linear").t_min == 1e-3
    # the float32 evaluation stays accurate where a (t -> 1) or s (t -> 0) is tiny
    t32 = torch.tensor([0.0, 1e-4, 0.9999, 1.0])
    a64, s64 = ref_vp_cosine(t32.double())
    torch.testing.assert_close(p.a(t32).double(), a64, rtol=1e-5, atol=0)
    torch.testing.assert_close(p.s(t32).double(), s64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", PROCESSES)
def test_logsnr_and_sigma_definitions(name):
    p = build_process(name)
    t = interior(p)
    a, s = REFS[name](t)
    torch.testing.assert_close(p.logsnr(t), 2 * torch.log(a / s), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.sigma(t), s / a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_t_of_sigma_inverts_sigma(name):
    p = build_process(name)
    t = torch.linspace(p.t_min, p.t_max, 201, dtype=D)
    if name == "flow":
        t = t[:-1]                       # sigma(1) is infinite; checked below
    torch.testing.assert_close(p.t_of_sigma(p.sigma(t)), t, rtol=0, atol=1e-9)
    sig = torch.logspace(-2, 1.5, 30, dtype=D)
    if name != "vp_cosine":              # (cosine's sigma range is [e^-10, e^10], also covered)
        torch.testing.assert_close(p.sigma(p.t_of_sigma(sig)), sig, rtol=1e-9, atol=0)


def test_flow_is_the_linear_interpolant():
    p = build_process("flow")
    t = torch.linspace(0, 1, 11, dtype=D)
    torch.testing.assert_close(p.a(t), 1 - t)
    torch.testing.assert_close(p.s(t), t)
    assert torch.all(p.da(t) == -1) and torch.all(p.ds(t) == 1)
    ends = p.t_of_sigma(torch.tensor([0.0, math.inf], dtype=D))
    assert ends.tolist() == [0.0, 1.0]
    assert math.isinf(float(p.sigma(torch.tensor(1.0, dtype=D))))


@pytest.mark.parametrize("name", PROCESSES)
def test_derivatives_match_float64_finite_differences(name):
    p = build_process(name)
    t = interior(p, 25)
    h = 1e-6
    for f, df in ((p.a, p.da), (p.s, p.ds)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 7, 18, 40])
def test_edm_grid_is_the_karras_rho_grid(n):
    p = build_process("edm")
    grid = p.grid(n)
    assert grid.dtype == D and grid.shape == (n + 1,)
    assert float(grid[0]) == p.t_max and float(grid[-1]) == p.t_min
    i = torch.arange(n + 1, dtype=D)
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    karras = (hi + i / n * (lo - hi)) ** 7        # Karras et al. 2022 eq. 5 (i = 0: sigma_max)
    torch.testing.assert_close(p.sigma(grid), karras, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", PROCESSES)
def test_grids_run_from_t_max_to_t_min(name):
    p = build_process(name)
    grid = p.grid(8)
    torch.testing.assert_close(grid, torch.linspace(p.t_max, p.t_min, 9, dtype=D))
    assert bool((grid[1:] < grid[:-1]).all())
    with pytest.raises(ValueError):
        p.grid(0)


def test_options_change_the_process():
    p = build_process("edm", sigma_max=10.0, rho=3.0)
    torch.testing.assert_close(p.sigma(torch.tensor(1.0, dtype=D)),
                               torch.tensor(10.0, dtype=D))
    q = build_process("vp_cosine", logsnr_min=-10.0, logsnr_max=10.0)
    torch.testing.assert_close(q.logsnr(torch.tensor([0.0, 1.0], dtype=D)),
                               torch.tensor([10.0, -10.0], dtype=D))


@pytest.mark.parametrize("name,options", [
    ("vp_cosinus", {}), ("edm", {"beta_max": 3.0}), ("edm", {"sigma_min": 0.0}),
    ("edm", {"sigma_min": 90.0}), ("vp_linear", {"beta_min": 5.0, "beta_max": 1.0}),
    ("vp_cosine", {"logsnr_min": 5.0, "logsnr_max": -5.0}), ("flow", {"t_min": 0.1}),
])
def test_bad_process_settings_are_user_errors(name, options):
    with pytest.raises(UserError) as err:
        build_process(name, **options)
    assert err.value.key == "task.process" and err.value.fix


@pytest.mark.parametrize("name", PROCESSES)
def test_python_floats_are_evaluated_in_float64(name):
    p = build_process(name)
    for f in (p.a, p.s, p.da, p.ds, p.sigma, p.t_of_sigma):
        assert f(0.5).dtype == D
    assert p.s(torch.tensor(0.5)).dtype == torch.float32      # tensors keep their dtype
