"""Noise processes z_t = a(t) x + s(t) eps, eps ~ N(0, I), on ONE time axis for all of them.

Convention (every process, every piece of the diffusion family): t in [0, 1], **t = 0 is data,
t = 1 is noise**. The VE-equivalent noise level is sigma(t) = s/a (x_sigma = z/a = x + sigma eps)
and the log signal-to-noise ratio logsnr(t) = 2 log(a/s). Sampling grids run t_max -> t_min.

- `vp_cosine`  Progressive distillation's log-SNR cosine schedule (Salimans & Ho 2022, PD
  `schedules.py` `_logsnr_schedule_cosine`, METHODS_FAMILIES.md A1): lambda(t) = -2 log tan(a_c t +
  b_c), b_c = arctan(exp(-lambda_max/2)), a_c = arctan(exp(-lambda_min/2)) - b_c, lambda_max = 20,
  lambda_min = -20; a^2 = sigmoid(lambda), s^2 = sigmoid(-lambda). With theta = a_c t + b_c this is
  exactly a = cos(theta), s = sin(theta). t_min 0, t_max 1.
- `vp_linear`  continuous DDPM / VP-SDE (Song et al. 2021): beta(t) = beta_min + t (beta_max -
  beta_min), a = exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2), s = sqrt(1 - a^2). s(0) = 0, so
  t_min = 1e-3 (the VP-SDE's eps); t_max 1.
- `edm`  Karras et al. 2022: a = 1, s = sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho. A uniform grid in t IS the Karras rho-grid. t_min 0 (sigma_min), t_max 1.
- `flow`  the linear interpolant of rectified flow / flow matching: a = 1 - t, s = t.
  Rectified flow's code (Liu et al. 2023, RF `losses.py`) uses the OPPOSITE time (its t = 0 is
  noise, t = 1 data; network time 999 t): our t = 1 - t_RF. RF trains and samples on t_RF in
  [eps, 1] with eps = 1e-3, i.e. it stays 1e-3 away from its NOISE end; here t_min = 0 (data) and
  t_max = 1 (pure noise, a = 0, sigma infinite): a velocity model is well defined there, and the
  samplers never divide by a (they use the model's predictions). The 1e-3 offset only changes where
  RF's first Euler step starts and is left out.

All formulas are analytic (also da/dt, ds/dt, the inverse t_of_sigma) and evaluated in the dtype of
the given time tensor (a python float becomes float64), written to stay accurate in float32 at both
ends (e.g. vp_cosine's a near t = 1 is computed as sin of a small angle, not cos of one near pi/2).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from distill_cli.errors import UserError

PROCESSES = ("vp_cosine", "vp_linear", "edm", "flow")


def _time(t) -> Tensor:
    """A tensor of times: floats become float64, integer tensors float64, float tensors as is."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


class Process:
    """z_t = a(t) x + s(t) eps. Subclasses define a, s, da, ds (and faster sigma / t_of_sigma /
    logsnr where they have one); `grid(n)` is uniform in t unless a subclass says otherwise."""

    name: str = ""
    t_min: float = 0.0
    t_max: float = 1.0

    def __init__(self, **options):
        self.options = dict(options)

    def a(self, t) -> Tensor:
        raise NotImplementedError

    def s(self, t) -> Tensor:
        raise NotImplementedError

    def da(self, t) -> Tensor:
        raise NotImplementedError

    def ds(self, t) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        t = _time(t)
        return self.s(t) / self.a(t)

    def t_of_sigma(self, sigma) -> Tensor:
        raise NotImplementedError

    def logsnr(self, t) -> Tensor:
        t = _time(t)
        return 2.0 * (torch.log(self.a(t)) - torch.log(self.s(t)))

    def grid(self, n: int) -> Tensor:
        """n+1 float64 times, grid[0] = t_max ... grid[n] = t_min (uniform in t)."""
        n = int(n)
        if n < 1:
            raise ValueError(f"a sampling grid needs n >= 1 steps, got {n}")
        return torch.linspace(self.t_max, self.t_min, n + 1, dtype=torch.float64)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name}{', ' + opts if opts else ''})"


class VPCosine(Process):
    """PD's log-SNR cosine schedule: a = cos(theta), s = sin(theta), theta = a_c t + b_c."""

    name = "vp_cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        logsnr_min, logsnr_max = float(logsnr_min), float(logsnr_max)
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)
                and logsnr_min < logsnr_max):
            raise UserError(f"vp_cosine needs finite logsnr_min < logsnr_max, got {logsnr_min}, "
                            f"{logsnr_max}", "task.process",
                            "use PD's defaults logsnr_min=-20 logsnr_max=20")
        super().__init__(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
        self.b_c = math.atan(math.exp(-logsnr_max / 2))
        self.a_c = math.atan(math.exp(-logsnr_min / 2)) - self.b_c
        # pi/2 - theta(t) = d_c + a_c (1 - t): a = sin of that small angle (float32-exact near 1)
        self.d_c = math.atan(math.exp(logsnr_min / 2))

    def a(self, t):
        t = _time(t)
        return torch.sin(self.d_c + self.a_c * (1.0 - t))

    def s(self, t):
        t = _time(t)
        return torch.sin(self.b_c + self.a_c * t)

    def da(self, t):
        return -self.a_c * self.s(t)

    def ds(self, t):
        return self.a_c * self.a(t)

    def t_of_sigma(self, sigma):
        sigma = _time(sigma)
        # theta = arctan(sigma); near pi/2 use pi/2 - theta = arctan(1/sigma) (no cancellation)
        low = (torch.atan(sigma) - self.b_c) / self.a_c
        high = 1.0 - (torch.atan(torch.reciprocal(sigma)) - self.d_c) / self.a_c
        return torch.where(sigma <= 1, low, high)


class VPLinear(Process):
    """Continuous DDPM (VP-SDE) with linear beta(t); s(0) = 0, hence t_min = 1e-3."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        beta_min, beta_max, t_min = float(beta_min), float(beta_max), float(t_min)
        if not (0 <= beta_min < beta_max and math.isfinite(beta_max) and 0 < t_min < 1):
            raise UserError(f"vp_linear needs 0 <= beta_min < beta_max and 0 < t_min < 1, got "
                            f"beta_min={beta_min}, beta_max={beta_max}, t_min={t_min}",
                            "task.process", "use the VP-SDE defaults beta_min=0.1 beta_max=20 "
                            "t_min=1e-3")
        super().__init__(beta_min=beta_min, beta_max=beta_max, t_min=t_min)
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min
        self.delta = beta_max - beta_min

    def _log_a(self, t):
        return -(0.25 * self.delta * t * t + 0.5 * self.beta_min * t)

    def _beta(self, t):
        return self.beta_min + self.delta * t

    def a(self, t):
        return torch.exp(self._log_a(_time(t)))

    def s(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_a(_time(t))))

    def da(self, t):
        t = _time(t)
        return -0.5 * self._beta(t) * self.a(t)

    def ds(self, t):
        t = _time(t)   # d sqrt(1 - a^2)/dt = -a a'/s = beta a^2 / (2 s)
        return 0.5 * self._beta(t) * torch.exp(2.0 * self._log_a(t)) / self.s(t)

    def sigma(self, t):
        return torch.sqrt(torch.expm1(-2.0 * self._log_a(_time(t))))

    def t_of_sigma(self, sigma):
        # -2 log a = log(1 + sigma^2) =: L = delta t^2/2 + beta_min t  (rationalised root)
        big_l = torch.log1p(_time(sigma) ** 2)
        return 2.0 * big_l / (self.beta_min + torch.sqrt(self.beta_min ** 2
                                                          + 2.0 * self.delta * big_l))

    def logsnr(self, t):
        return -torch.log(torch.expm1(-2.0 * self._log_a(_time(t))))


class EDM(Process):
    """Karras et al.'s sigma(t) with the rho-warp built into t: a = 1, s = sigma(t)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        sigma_min, sigma_max, rho = float(sigma_min), float(sigma_max), float(rho)
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max) and rho > 0):
            raise UserError(f"edm needs 0 < sigma_min < sigma_max and rho > 0, got sigma_min="
                            f"{sigma_min}, sigma_max={sigma_max}, rho={rho}", "task.process",
                            "use EDM's defaults sigma_min=0.002 sigma_max=80 rho=7")
        super().__init__(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.lo = sigma_min ** (1 / rho)
        self.span = sigma_max ** (1 / rho) - self.lo

    def a(self, t):
        return torch.ones_like(_time(t))

    def s(self, t):
        return (self.lo + _time(t) * self.span) ** self.rho

    def da(self, t):
        return torch.zeros_like(_time(t))

    def ds(self, t):
        return self.rho * self.span * (self.lo + _time(t) * self.span) ** (self.rho - 1)

    def sigma(self, t):
        return self.s(t)

    def t_of_sigma(self, sigma):
        return (_time(sigma) ** (1 / self.rho) - self.lo) / self.span

    def logsnr(self, t):
        return -2.0 * torch.log(self.s(t))


class Flow(Process):
    """Rectified flow / flow matching, data at t = 0: a = 1 - t, s = t."""

    name = "flow"

    def __init__(self):
        super().__init__()

    def a(self, t):
        return 1.0 - _time(t)

    def s(self, t):
        return _time(t).clone()

    def da(self, t):
        return torch.full_like(_time(t), -1.0)

    def ds(self, t):
        return torch.ones_like(_time(t))

    def t_of_sigma(self, sigma):
        # sigma = t / (1 - t)  <=>  t = 1 / (1 + 1/sigma): exact at sigma = 0 and sigma = inf
        return torch.reciprocal(1.0 + torch.reciprocal(_time(sigma)))

    def logsnr(self, t):
        t = _time(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))


_CLASSES = {"vp_cosine": VPCosine, "vp_linear": VPLinear, "edm": EDM, "flow": Flow}


def build_process(name: str, **options) -> Process:
    """The process called `name` with its options (e.g. `sigma_max` for edm)."""
    cls = _CLASSES.get(str(name))
    if cls is None:
        raise UserError(f"unknown noise process {name!r}", "task.process",
                        f"choose one of: {', '.join(PROCESSES)}")
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"noise process {name!r} has no option(s) {', '.join(unknown)}",
                        "task.process", f"its options are: {', '.join(known) or 'none'}")
    return cls(**options)
