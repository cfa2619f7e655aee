"""`Denoiser`: a backbone network + a noise process + a parameterisation (+ classifier-free
guidance) — the one model object every diffusion objective, sampler and evaluation talks to.

The backbone is `net(x_in [B, C, H, W], time [B], y [B] int64 | None) -> [B, C, H, W]`; `y` may
hold `num_classes` = the NULL label (the unconditional input of classifier-free guidance, Ho &
Salimans 2022); an unconditional Denoiser always passes `y=None`. The parameterisation says what
the backbone's output means (z = a x + s eps, c = a^2 + s^2, a' = da/dt, s' = ds/dt; time axis and
processes: noise.py):

param          raw output (what training regresses) -> x_hat, eps_hat from the output `out`
-------------  ---------------------------------------------------------------------------------
`eps`          eps                            -> x = (z - s out)/a
`x0`           x                              -> eps = (z - a out)/s
`v`            a eps - s x (Salimans & Ho;    -> x = (a z - s out)/c, eps = (s z + a out)/c
               generalised to any c)
`velocity`     dz/dt = a' x + s' eps (flow    -> x = (s' z - s out)/det, eps = (a out - a' z)/det,
               matching)                         det = a s' - s a'
`edm`          F of Karras et al. 2022        -> x = c_skip x_s + c_out F(c_in x_s, c_noise)
`consistency`  F, Song et al. 2023's boundary -> as edm, with c_skip = 1 and c_out = 0 at sigma_min

edm (EDM `training/networks.py` EDMPrecond), in VE terms for ANY process: sigma = s/a,
x_s = z/a, c_in = 1/sqrt(sigma^2 + sd^2), c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd /
sqrt(sigma^2 + sd^2), c_noise = log(sigma)/4, sd = sigma_data. consistency (CM
`karras_diffusion.py:68-78`, METHODS_FAMILIES.md A2): c_skip = sd^2/((sigma - sigma_min)^2 + sd^2),
c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2), sigma_min = the process's sigma(t_min), so
x_hat(z, t_min) = x_s EXACTLY. CM feeds the network 250 log sigma (= 1000 c_noise); we feed EDM's
c_noise = log(sigma)/4 to both (the backbone's sinusoidal embedding accepts any scale; a
consistency student initialised from an edm teacher then sees the time input the teacher was
trained with). log(sigma) is taken of max(sigma, 1e-20): a finite input even where sigma = 0.
The `flow` process refuses eps / edm / consistency: they divide by a, and a(1) = 0 where
sampling starts.
eps / x0 / v / velocity feed the network 1000 t (t in [0, 1], t = 0 data).

Classifier-free guidance (`predict`, `velocity`): with a conditional model and guidance w != 1,
x_hat = x_u + w (x_c - x_u) and eps_hat likewise, from ONE batched call of 2B rows (the labels,
then the null label); w = 1 is the conditional model, w = 0 the unconditional one. A conditional
model given y=None runs on the null label. Coefficients a, s, ... are computed in float64 from t
and applied in the dtype of z (float32 in training; float64 in the tests).

Zoo contract (models/registry.py): `stages` = "net." + the backbone's stage paths, `feature_dim` =
the backbone's bottleneck width, `classifier` = "net.out" (the backbone's output layer).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill_cli.errors import UserError
from distill_cli.models.diffusion import samplers
from distill_cli.models.diffusion.noise import Process, build_process

PARAMS = ("eps", "x0", "v", "velocity", "edm", "consistency")


def _as_process(process: str | Process) -> Process:
    return process if isinstance(process, Process) else build_process(process)


def _check_param(param: str) -> str:
    if param not in PARAMS:
        raise UserError(f"unknown diffusion parameterisation {param!r}", "task.param",
                        f"choose one of: {', '.join(PARAMS)}")
    return param


def _check_pair(process: Process, param: str) -> None:
    """flow's t_max has a = 0 (pure noise): a parameterisation that divides by a there (eps:
    x = (z - s eps)/a; edm / consistency: x_sigma = z/a) cannot predict the data."""
    if process.name == "flow" and param in ("eps", "edm", "consistency"):
        raise UserError(f"the {param} parameterisation is undefined on the flow process (a = 0 "
                        "at t = 1, where sampling starts)", "task.param",
                        "use task.param=velocity (flow matching), v or x0 with task.process=flow,"
                        " or another process (vp_cosine, vp_linear, edm)")


def _check_sampler(sampler: str) -> str:
    if sampler != "auto" and sampler not in samplers.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}", "student.sampler",
                        f"choose auto or one of: {', '.join(samplers.SAMPLERS)}")
    return sampler


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise UserError(f"the number of sampling steps must be an integer >= 1, got {steps!r}",
                        "task.steps", "use e.g. 32 for a teacher, 1-8 for a distilled student")
    return int(steps)


class Denoiser(nn.Module):
    """Backbone + process + parameterisation; see the module docstring for the formulas."""

    def __init__(self, net: nn.Module, *, process: str | Process, param: str, num_classes: int,
                 conditional: bool, sampler: str = "auto", steps: int = 32, guidance: float = 1.0,
                 sigma_data: float = 0.5, stages: tuple[str, ...] = (), feature_dim: int = 0,
                 start_sigma: float | None = None):
        super().__init__()
        self.net = net
        self.process = _as_process(process)
        self.param = _check_param(param)
        _check_pair(self.process, self.param)
        self.num_classes = int(num_classes)
        self.conditional = bool(conditional)
        if self.conditional and self.num_classes < 1:
            raise UserError(f"a class-conditional model needs num_classes >= 1, got "
                            f"{num_classes}", "task.conditional",
                            "use a labelled dataset or task.conditional=false")
        self.null_label = self.num_classes
        self.sampler = _check_sampler(sampler)
        self.steps = _check_steps(steps)
        self.guidance = float(guidance)
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UserError(f"classifier-free guidance must be a finite number >= 0, got "
                            f"{guidance}", "task.guidance",
                            "use 1.0 (the conditional model, no guidance) or e.g. 2.0")
        self.sigma_data = float(sigma_data)
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise UserError(f"sigma_data must be > 0, got {sigma_data}", "student.sigma_data",
                            "use 0.5 (EDM's value for images in [-1, 1])")
        # backbone-relative stage paths (or the backbone's own) seen from the Denoiser
        stages = tuple(stages) or tuple(getattr(net, "stages", ()))
        self.stages = tuple(p if p.startswith("net.") else "net." + p for p in stages)
        self.feature_dim = int(feature_dim or getattr(net, "feature_dim", 0))
        self.classifier = "net.out"
        # a one-step generator that starts below t_max (SiD's G(sigma_init z, sigma_init),
        # sigma_init = 2.5): its one move is from t_of_sigma(start_sigma); None = from t_max
        self.start_sigma = None if start_sigma is None else float(start_sigma)

    # ---- time and coefficients -------------------------------------------------------------
    def _times(self, t, z: Tensor) -> Tensor:
        """t as a [B] float64 tensor on z's device (python floats and 0-d tensors broadcast)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
        return t.expand(z.shape[0]) if t.dim() == 0 else t.to(torch.float64)

    def _col(self, value: Tensor, z: Tensor) -> Tensor:
        return value.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))

    def _precond(self, t64: Tensor, z: Tensor) -> dict[str, Tensor]:
        """EDM / consistency scalings as [B, 1, 1, 1] columns, and c_noise [B]."""
        sigma = self.process.sigma(t64)
        sd2 = self.sigma_data ** 2
        root = torch.sqrt(sigma ** 2 + sd2)
        if self.param == "consistency":
            shifted = sigma - float(self.process.sigma(self.process.t_min))
            c_skip = sd2 / (shifted ** 2 + sd2)
            c_out = shifted * self.sigma_data / root
        else:
            c_skip = sd2 / (sigma ** 2 + sd2)
            c_out = sigma * self.sigma_data / root
        return {"sigma": self._col(sigma, z), "c_in": self._col(1 / root, z),
                "c_skip": self._col(c_skip, z), "c_out": self._col(c_out, z),
                "c_noise": (0.25 * torch.log(sigma.clamp_min(1e-20))).to(z.dtype)}

    def _labels(self, y: Tensor | None, z: Tensor) -> Tensor | None:
        if not self.conditional:
            return None
        if y is None:
            return torch.full((z.shape[0],), self.null_label, dtype=torch.long, device=z.device)
        return y.long()

    # ---- the network in its parameterisation --------------------------------------------------
    def forward(self, z: Tensor, t, y: Tensor | None = None, output: str = "raw"):
        """The raw parameterisation output (what training regresses onto `target`). Training
        objectives call the student through its (possibly DistributedDataParallel-wrapped)
        module, so what they need comes out of `forward` too: `output="x_eps"` gives
        `(x_hat, eps_hat)` (unguided `predict`), `output="x0_sigma"` gives `x0_sigma(z, t, y)`
        with z = x_sigma and t = sigma."""
        if output == "x_eps":
            return self.to_x_eps(self(z, t, y), z, t)
        if output == "x0_sigma":
            return self.x0_sigma(z, t, y, guidance=1.0)
        if output != "raw":
            raise ValueError(f"output must be raw, x_eps or x0_sigma, got {output!r}")
        t64 = self._times(t, z)
        y = self._labels(y, z)
        if self.param in ("edm", "consistency"):
            c = self._precond(t64, z)
            x_sigma = z / self._col(self.process.a(t64), z)
            return self.net(c["c_in"] * x_sigma, c["c_noise"], y)
        return self.net(z, (1000.0 * t64).to(z.dtype), y)

    def to_x_eps(self, out: Tensor, z: Tensor, t) -> tuple[Tensor, Tensor]:
        """(x_hat, eps_hat) from a raw output `out` at (z, t) — `predict` without the network
        call (objectives that need both the raw output and x_hat run the network once)."""
        t64 = self._times(t, z)
        out = out.to(z.dtype)
        a = self._col(self.process.a(t64), z)
        s = self._col(self.process.s(t64), z)
        if self.param == "eps":
            return (z - s * out) / a, out
        if self.param == "x0":
            return out, (z - a * out) / s
        if self.param == "v":
            c = a * a + s * s
            return (a * z - s * out) / c, (s * z + a * out) / c
        if self.param == "velocity":
            da = self._col(self.process.da(t64), z)
            ds = self._col(self.process.ds(t64), z)
            det = a * ds - s * da
            return (ds * z - s * out) / det, (a * out - da * z) / det
        c = self._precond(t64, z)
        x_sigma = z / a
        x_hat = c["c_skip"] * x_sigma + c["c_out"] * out
        return x_hat, (x_sigma - x_hat) / c["sigma"]     # = (z - a x_hat)/s

    def predict(self, z: Tensor, t, y: Tensor | None = None, guidance: float | None = None
                ) -> tuple[Tensor, Tensor]:
        """(x_hat, eps_hat) at (z, t), with classifier-free guidance w = `guidance` (default
        self.guidance) when the model is conditional and y is given."""
        w = self.guidance if guidance is None else float(guidance)
        if not (self.conditional and y is not None and w != 1.0):
            return self.to_x_eps(self(z, t, y), z, t)
        t64 = self._times(t, z)
        null = torch.full_like(y.long(), self.null_label)
        z2, t2 = torch.cat([z, z]), torch.cat([t64, t64])
        x2, e2 = self.to_x_eps(self(z2, t2, torch.cat([y.long(), null])), z2, t2)
        (x_c, x_u), (e_c, e_u) = x2.chunk(2), e2.chunk(2)
        return x_u + w * (x_c - x_u), e_u + w * (e_c - e_u)

    def target(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """The parameterisation's regression target for clean `x` and noise `eps` at t."""
        t64 = self._times(t, x)
        if self.param == "eps":
            return eps
        if self.param == "x0":
            return x
        a = self._col(self.process.a(t64), x)
        s = self._col(self.process.s(t64), x)
        if self.param == "v":
            return a * eps - s * x
        if self.param == "velocity":
            return self._col(self.process.da(t64), x) * x + self._col(self.process.ds(t64), x) * eps
        c = self._precond(t64, x)
        x_sigma = x + c["sigma"] * eps                    # = (a x + s eps)/a
        return (x - c["c_skip"] * x_sigma) / c["c_out"]

    def velocity(self, z: Tensor, t, y: Tensor | None = None, guidance: float | None = None
                 ) -> Tensor:
        """The probability-flow ODE's dz/dt = a' x_hat + s' eps_hat (any process)."""
        x_hat, eps_hat = self.predict(z, t, y, guidance)
        t64 = self._times(t, z)
        return (self._col(self.process.da(t64), z) * x_hat
                + self._col(self.process.ds(t64), z) * eps_hat)

    def x0_sigma(self, x_sigma: Tensor, sigma, y: Tensor | None = None,
                 guidance: float | None = None) -> Tensor:
        """x_hat at VE noise level `sigma` for x_sigma = x + sigma eps, whatever the process:
        t = t_of_sigma(sigma), z = a(t) x_sigma (runs a teacher of one process on another
        process's grid, e.g. consistency distillation on a VP teacher)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x_sigma.device)
        t64 = self.process.t_of_sigma(sigma)
        t64 = t64.expand(x_sigma.shape[0]) if t64.dim() == 0 else t64
        z = self._col(self.process.a(t64), x_sigma) * x_sigma
        return self.predict(z, t64, y, guidance)[0]

    # ---- re-purposing and sampling ------------------------------------------------------------
    def set_diffusion(self, *, process: str | Process | None = None, param: str | None = None,
                      sampler: str | None = None, steps: int | None = None,
                      start_sigma: float | None = None) -> None:
        """Change what the backbone's output means / how the model samples; keeps the weights
        (progressive distillation: v on vp_cosine; consistency: the 'consistency' param)."""
        new_process = self.process if process is None else _as_process(process)
        new_param = self.param if param is None else _check_param(param)
        _check_pair(new_process, new_param)
        self.process, self.param = new_process, new_param
        if sampler is not None:
            self.sampler = _check_sampler(sampler)
        if steps is not None:
            self.steps = _check_steps(steps)
        if start_sigma is not None:
            self.start_sigma = float(start_sigma)

    def start_time(self) -> float:
        """Where `generate` starts: t_max, or a one-step generator's t_of_sigma(start_sigma)."""
        p = self.process
        if self.start_sigma is None:
            return float(p.t_max)
        t = float(p.t_of_sigma(torch.tensor(self.start_sigma, dtype=torch.float64)))
        return min(max(t, float(p.t_min)), float(p.t_max))

    @property
    def resolved_sampler(self) -> str:
        """The sampler `generate` uses ("auto" resolved, samplers.resolve)."""
        return samplers.resolve(self, self.sampler)

    @torch.no_grad()
    def generate(self, noise: Tensor, y: Tensor | None = None, steps: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] from standard-normal `noise` with the model's own sampler."""
        steps = self.steps if steps is None else steps
        grid = None
        if self.start_sigma is not None and self.resolved_sampler == "onestep":
            grid = torch.tensor([self.start_time(), float(self.process.t_min)],
                                dtype=torch.float64)
        return samplers.sample(self, noise, y, steps=steps, method=self.resolved_sampler,
                               guidance=self.guidance, generator=generator, grid=grid)

    def extra_repr(self) -> str:
        return (f"process={self.process.name}, param={self.param}, conditional="
                f"{self.conditional}, sampler={self.sampler}, steps={self.steps}, "
                f"guidance={self.guidance}"
                + ("" if self.start_sigma is None else f", start_sigma={self.start_sigma}"))
