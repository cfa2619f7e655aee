"""Score identity Distillation — Zhou et al., ICML 2024 "Score identity Distillation:
Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step Generation"
(METHODS_FAMILIES.md A7), as the authors' code computes it: mingyuanzhou/SiD
`training/sid_loss.py` (SID_EDMLoss.generator_loss / __call__) and
`training/sid_training_loop.py:294-343` (one fake-score step, then one generator step)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill_cli.draws import NoiseSeeded
from distill_cli.errors import UserError
from distill_cli.losses.base import CriticObjective
from distill_cli.tasks.diffusion.methods.common import col, per_sample_mean, unwrap
from distill_cli.tasks.diffusion.methods.matching import (
    DistributionMatching,
    detached_call,
    grid_times,
    noised,
)

W_MIN = 1e-5   # SiD: weight_factor.clip(min=0.00001)


def sid_generator_loss(x: Tensor, real_x0: Tensor, fake_x0: Tensor, alpha: float) -> Tensor:
    """[B] per-sample SiD generator loss, summed over pixels (sid_loss.py:25-56):
    w = sg(mean_CHW |x - y_r|).clip(1e-5), l = (y_r - y_f)((y_r - x) - alpha (y_r - y_f)) / w.
    No stop-gradient on y_r / y_f: their gradient reaches x through the networks' inputs."""
    with torch.no_grad():
        w = per_sample_mean((x - real_x0).abs().float()).clamp(min=W_MIN)
    diff = real_x0 - fake_x0
    return (diff * ((real_x0 - x) - alpha * diff) / col(w, x)).flatten(1).sum(1)


class SiD(DistributionMatching, NoiseSeeded, CriticObjective):
    """One-step generator x_g = G(s(t_init) z, t_init) (the student, a copy of the teacher;
    t_init = t_of_sigma(start_sigma), SiD's G(sigma_init z, sigma_init), sigma_init 2.5), the
    frozen teacher f_phi and the fake score f_psi (a copy of the teacher). Each optimizer step:

    1. fake score (critic first, `topology.update_critic`): on x_c = sg(G(z_1)),
       L_psi = the `fake_loss` denoising loss (SiD: EDM weighting lambda(sigma) =
       (sigma^2 + sd^2)/(sigma sd)^2, ln sigma ~ N(-1.2, 1.2^2)); one critic optimizer step.
    2. generator, on FRESH noise (SiD draws new z and a new data batch for each turn):
       x_g = G(z_2); t at a grid index ~ U{0..800} (SiD's u ~ U[0, tmax/1000], tmax 800);
       z_t = a(t) x_g + s(t) eps;
       y_r = f_phi(z_t, t) (the teacher's x-prediction, with its classifier-free guidance for a
             conditional teacher), y_f = f_psi(z_t, t) AFTER step 1 (unguided);
       w = sg(mean_CHW |x_g - y_r|).clip(1e-5);
       L_theta = loss_scaling * mean_batch sum_CHW (y_r - y_f)((y_r - x_g) - alpha (y_r - y_f)) / w
       (alpha 1.2, loss_scaling_G 100). Gradient flows through x_g into BOTH networks' inputs
       (their parameters do not learn from it: the teacher's are frozen, the fake score's are
       detached, `detached_call`); only w is detached. The loss value may be negative.

    Ours, stated:
    - Time grid: SiD's sigma(u) = (sigma_max^(1/rho) + (1 - u)(sigma_min^(1/rho) -
      sigma_max^(1/rho)))^rho is EDM's Karras time u itself, so on an `edm` teacher U{0..800}
      of our 1000-point `time_grid` is SiD's range (u <= 800/999 instead of <= 0.8). On the VP
      cosine teachers of our recipes the grid is uniform in t: the same index range reaches
      sigma = tan(0.8 pi/2) ~ 3.1, not SiD's ~24.4 (min/max_step_percent choose it).
    - start_sigma 2.5 applies to every process: sigma = s/a is the noise-to-signal ratio, so
      the generator's input s(t) z at t = t_of_sigma(2.5) is SiD's sigma_init z seen through the
      teacher's own parameterisation (a VP teacher at SNR 1/2.5^2, where an EDM teacher would
      see the same SNR); t = 0.758 on vp_cosine.
    - The fake-score loss is our `Denoising` node: mean over pixels (SiD: sum over pixels x
      loss_scaling 1 / batch: a constant factor, C H W, that Adam's normalisation removes but
      for its eps); the fake-score step uses the same batch labels as the generator step.
    - SiD drops rows with NaN and nan_to_num's the gradients; here a non-finite loss stops the
      run (trainer.on_nonfinite). No EMA of the generator (SiD: half-life 0.5 Mimg): the
      evaluated generator is the raw one. The authors' optimiser (Adam betas (0, 0.999),
      lr 1e-5 for both networks) sits in the recipes / YAML comment, not here.
    Terms: loss, sid (the unscaled per-sample loss, batch mean), score_gap (mean (y_r - y_f)^2),
    gen_turn (always 1), critic_loss, critic_dsm."""

    name = "sid"
    critic_first = True

    def __init__(self, alpha: float = 1.2, loss_scaling: float = 100.0, start_sigma=2.5,
                 min_step_percent: float = 0.0, max_step_percent: float = 0.8,
                 fake_loss=None, critic_grad_clip=None):
        super().__init__()
        self.alpha = _positive(alpha, "loss.alpha", "Use SiD's alpha=1.2 (the paper's range: "
                               "0.5 to 1.2)")
        self.loss_scaling = _positive(loss_scaling, "loss.loss_scaling",
                                      "Use SiD's loss_scaling_G=100")
        self.init_matching(ratio=1, generator_steps=1, start_sigma=start_sigma,
                           min_step_percent=min_step_percent, max_step_percent=max_step_percent,
                           fake_loss=fake_loss, gan=False, critic_grad_clip=critic_grad_clip)

    def step_terms(self, student, topology, batch, ctx) -> dict[str, Tensor]:
        """Draw order: the critic's sample noise, the fake-score loss's draws (t, eps, label
        dropout), then the generator's fresh noise, its grid index and eps."""
        draws = self.draws(batch, ctx)
        x_c, _ = self.schedule.samples(student, batch, draws, 0, grad=False)
        critic = self.critic_terms(x_c.detach(), topology.critic, batch, draws)
        topology.update_critic(critic["critic_loss"])   # SiD: the fake score first
        critic["critic_loss"] = critic["critic_loss"].detach()
        x_g, _ = self.schedule.samples(student, batch, draws, 0, grad=True)
        terms = self.generator_terms(x_g, student, topology, batch, draws)
        terms["gen_turn"] = torch.ones((), device=x_g.device)
        terms.update(critic)
        return terms

    def generator_terms(self, x, student, topology, batch, draws) -> dict[str, Tensor]:
        teacher = topology.model
        process = teacher.process
        y = batch.y if unwrap(teacher).conditional else None
        t = grid_times(process, draws, *self.dm_range)
        z = noised(process, x, t, draws.normal(*x.shape[1:]))   # with x's graph
        real = teacher.predict(z, t, y)[0].float()               # frozen parameters
        fake = detached_call(topology.critic, z, t, y, mode="x0").float()
        per_sample = sid_generator_loss(x, real, fake, self.alpha)
        return {"loss": self.loss_scaling * per_sample.mean(),
                "sid": per_sample.detach().mean(),
                "score_gap": (real - fake).detach().pow(2).mean()}

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, loss_scaling={self.loss_scaling}, "
                f"start_sigma={self.schedule.start_sigma}, t_range={self.dm_range}")


def _positive(value, key: str, fix: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise UserError(f"{key.split('.')[-1]} must be a finite number > 0, got {value!r}",
                        key, fix)
    return v
