"""Samplers for any `Denoiser` (denoiser.py) on any process (noise.py; t = 0 data, t = 1 noise).

Everything is written with the model's predictions (x_hat, eps_hat), which satisfy
z = a x_hat + s eps_hat, so no sampler divides by a(t) (flow's a(1) = 0):

- `ddim`   z_u = a(u) x_hat + s(u) eps_hat — deterministic DDIM (Song et al. 2021), exact
           first-order for any process; PD's `ddim_step` (METHODS_FAMILIES.md A1).
- `euler`  z_u = z + (u - t) v,  v = a' x_hat + s' eps_hat (the probability-flow ODE's dz/dt).
- `heun`   EDM's 2nd order step (Karras et al. 2022, Alg. 1): z' = z + (u - t) v(z, t);
           z_u = z + (u - t)(v(z, t) + v(z', u))/2, plain Euler where s(u) = 0 (EDM's last step
           to sigma = 0). CM's consistency distillation uses this step between grid points.
- `ddpm`   ancestral sampling from the Gaussian posterior q(z_u | z_t, x = x_hat): with
           r = SNR(t)/SNR(u), z_u = (a_t/a_u)(s_u/s_t)^2 z + (1 - r) a_u x_hat + sqrt(1 - r) s_u xi.
- `consistency`  Song et al. 2023's multistep sampler (CM `karras_diffusion.py:643-681`):
           x = f(z_{t_max}); for each next grid time u: z = a(u) x + s(u) xi, x = f(z, u).
           (CM adds noise of std sqrt(sigma_u^2 - sigma_min^2) because its x already sits at
           sigma_min; we add the process's s(u), the design's choice: a difference of
           sigma_min^2 = 4e-6 in variance.)
- `onestep` x_hat of the model at t_max (Luhman & Luhman 2021; a 1-step student), 1 evaluation.

The grid: `steps` moves along grid = process.grid(steps) (t_max -> t_min, n + 1 times). The move
INTO t_min (the data end) returns the x_hat predicted at the previous grid time instead of a
solver step, so `steps` is the number of network evaluations (Heun: 2 steps - 1). This is each
source's own last step: PD's DDIM returns x_hat on its last step, EDM's final Euler step to
sigma = 0 and rectified flow's final Euler step to the data end both equal x_hat, and CM's
multistep returns its last f. With `clip`, ddim / ddpm / consistency clip x_hat to [-1, 1] at
every step (PD's eval_clip_denoised, CM's clip_denoised; eps_hat is then recomputed from the
clipped x_hat), and every sampler clips its result.

Determinism: noise is drawn only from the given `generator` (ddpm, consistency need one); the
others ignore it. No global RNG is touched.
"""
from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from distill_cli.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from distill_cli.models.diffusion.noise import Process

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "consistency", "onestep")
DETERMINISTIC = ("ddim", "euler", "heun")
STOCHASTIC = ("ddpm", "consistency")


def resolve(model: Denoiser, method: str) -> str:
    """"auto": the consistency param -> consistency, flow / velocity -> euler, edm (process or
    param) -> heun, else ddim. Other names are checked and returned."""
    if method == "auto":
        if model.param == "consistency":
            return "consistency"
        if model.process.name == "flow" or model.param == "velocity":
            return "euler"
        if model.process.name == "edm" or model.param == "edm":
            return "heun"
        return "ddim"
    if method not in SAMPLERS:
        raise UserError(f"unknown sampler {method!r}", "student.sampler",
                        f"choose auto or one of: {', '.join(SAMPLERS)}")
    return method


def _col(values: Tensor, z: Tensor) -> Tensor:
    return values.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))


def _coef(fn, t, z: Tensor) -> Tensor:
    """process function `fn` at t (python float or [B] tensor) as a [B|1, 1, 1, 1] column in
    z's dtype, evaluated in float64."""
    return _col(fn(torch.as_tensor(t, dtype=torch.float64, device=z.device)).reshape(-1), z)


def initial_noise(process: Process, noise: Tensor) -> Tensor:
    """z at t_max for standard-normal `noise`: a(t_max) * 0 + s(t_max) * noise."""
    return _coef(process.s, process.t_max, noise) * noise


def _predict(model, z, t, y, guidance, clip: bool) -> tuple[Tensor, Tensor]:
    """(x_hat, eps_hat); with `clip`, x_hat clipped to [-1, 1] and eps_hat recomputed from it."""
    x_hat, eps_hat = model.predict(z, t, y, guidance)
    if clip:
        x_hat = x_hat.clamp(-1, 1)
        p = model.process
        eps_hat = (z - _coef(p.a, t, z) * x_hat) / _coef(p.s, t, z)
    return x_hat, eps_hat


def _ddim(model, z, t, u, y, guidance, clip: bool) -> Tensor:
    x_hat, eps_hat = _predict(model, z, t, y, guidance, clip)
    p = model.process
    return _coef(p.a, u, z) * x_hat + _coef(p.s, u, z) * eps_hat


def _ddpm(model, z, t, u, y, guidance, clip: bool, generator) -> Tensor:
    x_hat, _ = _predict(model, z, t, y, guidance, clip)
    p = model.process
    a_t, s_t, a_u, s_u = (_coef(f, v, z) for f, v in ((p.a, t), (p.s, t), (p.a, u), (p.s, u)))
    # 1 - r with r = SNR(t)/SNR(u) < 1, from the log-SNRs (accurate when t and u are close)
    one_minus_r = -torch.expm1(_coef(p.logsnr, t, z) - _coef(p.logsnr, u, z))
    mean = (a_t / a_u) * (s_u / s_t) ** 2 * z + one_minus_r * a_u * x_hat
    xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return mean + torch.sqrt(one_minus_r) * s_u * xi


def step(model: Denoiser, z: Tensor, t, u, y: Tensor | None = None, *, method: str,
         guidance: float | None = None) -> Tensor:
    """One deterministic move of the probability-flow ODE from t to u < t ("ddim" | "euler" |
    "heun"); t and u are python floats or [B] tensors (per-example times). No clipping."""
    if method == "ddim":
        return _ddim(model, z, t, u, y, guidance, clip=False)
    if method not in ("euler", "heun"):
        raise ValueError(f"step() takes ddim, euler or heun, got {method!r}")
    p = model.process
    dt = _coef(lambda v: v, u, z) - _coef(lambda v: v, t, z)
    v_t = model.velocity(z, t, y, guidance)
    z_euler = z + dt * v_t
    if method == "euler":
        return z_euler
    s_u = _coef(p.s, u, z)
    if bool((s_u == 0).all()):           # EDM: no second evaluation where s(u) = 0
        return z_euler
    v_u = model.velocity(z_euler, u, y, guidance)
    return torch.where(s_u == 0, z_euler, z + dt * 0.5 * (v_t + v_u))


def _check(method: str, steps, generator) -> int:
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise UserError(f"the number of sampling steps must be an integer >= 1, got {steps!r}",
                        "task.steps", "use e.g. 1, 2, 4 or 8")
    steps = int(steps)
    if method == "onestep" and steps != 1:
        raise UserError(f"the onestep sampler takes exactly 1 step, got steps={steps}",
                        "task.steps", "use steps=1, or a multistep sampler (consistency, ddim, "
                        "euler, heun, ddpm)")
    if method in STOCHASTIC and generator is None:
        raise ValueError(f"the {method} sampler draws noise: pass an explicit torch.Generator")
    return steps


@torch.no_grad()
def sample(model: Denoiser, noise: Tensor, y: Tensor | None = None, *, steps: int,
           method: str, guidance: float | None = None,
           generator: torch.Generator | None = None, clip: bool = True,
           grid: Tensor | None = None) -> Tensor:
    """Samples x at t_min from standard-normal `noise` [B, C, H, W] in `steps` moves along
    `grid` (default model.process.grid(steps)); see the module docstring."""
    method = resolve(model, method)
    steps = _check(method, steps, generator)
    grid = model.process.grid(steps) if grid is None else torch.as_tensor(grid,
                                                                          dtype=torch.float64)
    if grid.dim() != 1 or len(grid) != steps + 1 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"a grid for {steps} steps must be {steps + 1} decreasing times, got "
                         f"{grid.tolist()}")
    ts = [float(v) for v in grid]
    p = model.process
    z = _coef(p.s, ts[0], noise) * noise
    if method in ("onestep", "consistency"):
        x = _predict(model, z, ts[0], y, guidance, clip)[0]
        for u in ts[1:steps]:
            xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = _coef(p.a, u, z) * x + _coef(p.s, u, z) * xi
            x = _predict(model, z, u, y, guidance, clip)[0]
    else:
        for t, u in pairwise(ts[:steps]):
            if method == "ddim":
                z = _ddim(model, z, t, u, y, guidance, clip)
            elif method == "ddpm":
                z = _ddpm(model, z, t, u, y, guidance, clip, generator)
            else:
                z = step(model, z, t, u, y, method=method, guidance=guidance)
        x = model.predict(z, ts[steps - 1], y, guidance)[0]    # the move into t_min
    return x.clamp(-1, 1) if clip else x
