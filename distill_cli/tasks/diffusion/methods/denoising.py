"""The teachers' own objective: denoising score matching / flow matching (no teacher).

Per example: t ~ p(t), eps ~ N(0, I), z = a(t) x + s(t) eps, y = the label (the null label with
probability `label_dropout` when the student is class-conditional: classifier-free guidance
training, Ho & Salimans 2022), and

    loss = mean_i  w(t_i) * mean_dims (err_i)^2

- `uniform`    err = student(z, t, y) - student.target(x, eps, t): plain MSE in the model's own
               parameterisation (flow matching's velocity loss, Lipman et al. 2023 / RF
               `losses.py:55-131`; DDPM's "simple" loss for the eps param).
- `snr_trunc`  err = x_hat - x (x_hat from the prediction), w = max(1, SNR(t)): progressive
               distillation's "truncated SNR" weighting (PD `dpm.py` `training_losses`,
               METHODS_FAMILIES.md A1: L = max(x_mse, eps_mse) = max(1, SNR) x_mse, since
               eps_hat - eps = -(a/s)(x_hat - x) exactly). PD computes it from x_hat for every
               mean_type; so do we: the weight is applied in x-space whatever the param.
- `edm`        err = x_hat - x, w = lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 = SNR + 1/sd^2
               (EDM, Karras et al. 2022, sd = the student's sigma_data): exactly the uniform MSE
               on F for the `edm` param (lambda c_out^2 = 1).

SNR = exp(logsnr(t)) with logsnr capped at 20 (PD's lambda_max; it only bites for `flow` near its
data end, where SNR -> inf; the other processes stay below 20).
Times: `uniform` t ~ U(t_min, t_max] (t = t_max - (t_max - t_min) u, u ~ U[0, 1): never the data
end itself, where s may be 0); `lognormal` EDM's ln sigma ~ N(p_mean, p_std^2) (-1.2, 1.2), mapped
to t = process.t_of_sigma(sigma) and clamped to [t_min, t_max].
Randomness: per sample, from `SampleDraws(noise_seed, step, batch.index)` (methods/common.py:
a pure function of the seed, the optimizer step and the sample's index, so torchrun ranks holding
slices of the global batch draw what one process draws), in this FIXED order: t (uniform: one
U[0, 1) value; lognormal: one N(0, 1) value), eps (N(0, I) of the image's shape), then the label
dropout draw (one U[0, 1) value; only for a class-conditional student with label_dropout > 0).
`noise_seed` is a buffer drawn once in `bind` from the default RNG (seeded with cfg.seed).
Terms: loss; mse_x (unweighted mean (x_hat - x)^2); mse (unweighted parameterisation-space MSE).
"""
from __future__ import annotations

import math

import torch

from distill_cli.draws import NoiseSeeded, SampleDraws
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext, StepObjective
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.tasks.diffusion.methods.common import col, unwrap

WEIGHTINGS = ("uniform", "snr_trunc", "edm")
TIME_SAMPLING = ("uniform", "lognormal")
LOGSNR_CAP = 20.0   # PD's lambda_max


def require_denoiser(student, loss: str) -> Denoiser:
    core = unwrap(student)
    if not isinstance(core, Denoiser):
        raise UserError(f"loss={loss} trains a diffusion model, but the student is a "
                        f"{type(core).__name__}", "student",
                        "use task=diffusion with a diffusion student (e.g. student=unet_tiny)")
    return core


class Denoising(NoiseSeeded, StepObjective):
    """Denoising score matching / flow matching; see the module docstring."""

    task_name = "diffusion"
    needs_teacher = False
    accepts_soft_targets = False   # mixup / CutMix would blend the images the model must learn
    batch_coupling = None          # per-example terms, batch mean

    def __init__(self, weighting: str = "snr_trunc", time_sampling: str = "uniform",
                 label_dropout: float = 0.0, p_mean: float = -1.2, p_std: float = 1.2,
                 require_process: str | None = None, require_param: str | None = None,
                 name: str = "dsm"):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown weighting {weighting!r}", "loss.weighting",
                            f"choose one of: {', '.join(WEIGHTINGS)}")
        if time_sampling not in TIME_SAMPLING:
            raise UserError(f"unknown time sampling {time_sampling!r}", "loss.time_sampling",
                            f"choose one of: {', '.join(TIME_SAMPLING)}")
        label_dropout = float(label_dropout)
        if not (0.0 <= label_dropout < 1.0):
            raise UserError(f"label_dropout must be in [0, 1), got {label_dropout}",
                            "loss.label_dropout",
                            "use 0.1 (classifier-free guidance training) or 0 (none)")
        p_mean, p_std = float(p_mean), float(p_std)
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0):
            raise UserError(f"lognormal times need a finite p_mean and p_std > 0, got "
                            f"p_mean={p_mean}, p_std={p_std}", "loss.p_std",
                            "use EDM's p_mean=-1.2 p_std=1.2")
        self.weighting, self.time_sampling = weighting, time_sampling
        self.label_dropout, self.p_mean, self.p_std = label_dropout, p_mean, p_std
        self.require_process, self.require_param = require_process, require_param
        self.name = str(name)
        self.init_noise_seed()

    def bind(self, student, teacher, data) -> None:
        core = require_denoiser(student, self.name)
        fix = (f"loss={self.name} needs task.process={self.require_process} "
               f"task.param={self.require_param} (the student YAML reads them); for other "
               "processes / parameterisations use loss=dsm")
        if self.require_process and core.process.name != self.require_process:
            raise UserError(f"loss={self.name} trains a {self.require_process} model, but the "
                            f"student's process is {core.process.name}", "student.process", fix)
        if self.require_param and core.param != self.require_param:
            raise UserError(f"loss={self.name} trains the {self.require_param} "
                            f"parameterisation, but the student's param is {core.param}",
                            "student.param", fix)
        self.draw_noise_seed()

    def sample_times(self, process, draws: SampleDraws) -> torch.Tensor:
        """[B] float32 times from the configured distribution (one draw per sample)."""
        if self.time_sampling == "uniform":
            u = draws.uniform()
            return (process.t_max - (process.t_max - process.t_min) * u).float()
        sigma = torch.exp(self.p_mean + self.p_std * draws.normal(dtype=torch.float64))
        return process.t_of_sigma(sigma).clamp(process.t_min, process.t_max).float()

    def labels(self, core: Denoiser, y: torch.Tensor | None, draws: SampleDraws
               ) -> torch.Tensor | None:
        n = len(draws)
        if not core.conditional:
            return None
        if y is None or y.is_floating_point() or y.shape != (n,):
            raise UserError("a class-conditional diffusion model needs integer class labels [B], "
                            f"got {None if y is None else (tuple(y.shape), y.dtype)}",
                            "task.conditional", "use a labelled dataset without mixup/CutMix, or "
                            "task.conditional=false")
        if self.label_dropout > 0:
            drop = draws.uniform() < self.label_dropout
            y = torch.where(drop, torch.full_like(y, core.null_label), y)
        return y

    def weights(self, core: Denoiser, t: torch.Tensor) -> torch.Tensor:
        """w(t) [B] float32 for the x-space weightings."""
        snr = torch.exp(core.process.logsnr(t.double()).clamp(max=LOGSNR_CAP))
        if self.weighting == "snr_trunc":
            return snr.clamp(min=1.0).float()
        return (snr + 1.0 / core.sigma_data ** 2).float()    # edm: 1/sigma^2 + 1/sd^2

    def step_terms(self, student, teacher, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.terms(student, batch.x.float(), batch.y, self.draws(batch, ctx))

    def terms(self, model, x: torch.Tensor, y: torch.Tensor | None, draws: SampleDraws
              ) -> dict[str, torch.Tensor]:
        """The loss of `model` (a Denoiser, possibly DDP-wrapped: called through its forward)
        on clean images `x` [B, ...], drawing from `draws` in the docstring's order. Also the
        fake-score networks' loss of the distribution-matching methods (matching.py), on the
        generator's detached samples."""
        core = unwrap(model)
        t = self.sample_times(core.process, draws)
        eps = draws.normal(*x.shape[1:], dtype=x.dtype)
        t64 = t.double()
        z = col(core.process.a(t64), x) * x + col(core.process.s(t64), x) * eps
        y = self.labels(core, y, draws)
        out = model(z, t, y).float()         # the (possibly wrapped) module's forward
        uniform = self.weighting == "uniform"
        # the term that is not the loss is logged only: computed without a graph
        with torch.set_grad_enabled(uniform and torch.is_grad_enabled()):
            mse = (out - core.target(x, eps, t)).pow(2).flatten(1).mean(1)
        with torch.set_grad_enabled(not uniform and torch.is_grad_enabled()):
            mse_x = (core.to_x_eps(out, z, t)[0] - x).pow(2).flatten(1).mean(1)
        loss = mse.mean() if uniform else (self.weights(core, t) * mse_x).mean()
        return {"loss": loss, "mse_x": mse_x.detach().mean(), "mse": mse.detach().mean()}

    def extra_repr(self) -> str:
        return (f"weighting={self.weighting}, time_sampling={self.time_sampling}, "
                f"label_dropout={self.label_dropout}")
