"""What the distribution-matching methods share (DMD, DMD2, SiD, f-distill, phased DMD;
METHODS_FAMILIES.md A5-A9): the online fake-score network and its GAN head, calls into networks
whose parameters must not learn from a loss, the time grid, the generator's samples (one step,
or several with DMD2's backward simulation) and the distribution-matching direction.

Time grid: DMD2 indexes noise levels on a 1000-point grid, index 0 the least noise
(`karras_sigmas` flipped, DMD2 `edm_guidance.py:60-67`). Ours is the teacher's own sampling grid
`process.grid(999)` flipped the same way: Karras' grid for `edm`, uniform in t for the VP and flow
processes (DDPM's 1000 training steps: DMD2's SD variant indexes those).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_cli.draws import SampleDraws
from distill_cli.errors import UserError
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.taps import FeatureTaps
from distill_cli.seeding import derive_seed
from distill_cli.tasks.diffusion.methods.common import (
    adopt_teacher_guidance,
    check_denoiser,
    col,
    copy_teacher_weights,
    per_sample_mean,
    positive_int,
    unwrap,
)
from distill_cli.tasks.diffusion.methods.denoising import Denoising

GRID_POINTS = 1000


def time_grid(process) -> Tensor:
    """[1000] float64 times, index 0 = t_min (least noise) ... 999 = t_max."""
    return process.grid(GRID_POINTS - 1).flip(0)


def grid_times(process, draws: SampleDraws, low: int, high: int) -> Tensor:
    """[B] float64 times at per-sample indices ~ U{low, ..., high} of `time_grid`."""
    index = low + draws.integers(high - low + 1)
    return time_grid(process).to(index.device)[index]


def check_step_range(low, high, key: str) -> tuple[int, int]:
    """DMD2's min/max_step_percent as grid indices (20, 980 for 0.02, 0.98)."""
    low, high = float(low), float(high)
    if not (0.0 <= low <= high <= 1.0):
        raise UserError(f"the time range [{low}, {high}] must satisfy 0 <= min <= max <= 1",
                        key, "Use DMD2's min_step_percent=0.02 max_step_percent=0.98")
    return int(low * GRID_POINTS), min(int(high * GRID_POINTS), GRID_POINTS - 1)


def noised(process, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """z_t = a(t) x + s(t) eps at per-sample float64 times `t`."""
    return col(process.a(t), x) * x + col(process.s(t), x) * eps


def detached_call(module: nn.Module, *args, **kwargs):
    """`module(*args, **kwargs)` with every parameter detached: the output's gradient reaches
    the INPUTS only (the generator's turn through the fake score: DMD2 sets the guidance model
    requires_grad(False) for it, edm_unified_model.py:52-58; SiD's generator loss likewise)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs, strict=False)


class DiscriminatorHead(nn.Module):
    """A GAN logit from the fake score's bottleneck features. DMD2's `cls_pred_branch` (conv4 s2,
    GN, SiLU, conv4 s4, GN, SiLU, conv1: an 8x8 map to one logit, edm_guidance.py:47-57) is
    sized for ImageNet-64's bottleneck; ours takes any resolution: conv3x3, GroupNorm, SiLU,
    global average pool, linear -> 1 logit (a [B, N, D] token bottleneck: LayerNorm, token mean,
    linear, SiLU, linear)."""

    def __init__(self, feature: Tensor):
        super().__init__()
        if feature.dim() == 4:
            c = feature.shape[1]
            # >= 2 channels a group: a group of one cancels the conv's bias (a dead parameter
            # whose rounding-noise gradient Adam turns into lr-sized steps)
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and (c // g >= 2
                                                                              or g == 1))
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c),
                                      nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(c, 1))
            self.tokens = False
        elif feature.dim() == 3:
            d = feature.shape[2]
            self.norm = nn.LayerNorm(d)
            self.body = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
            self.tokens = True
        else:
            raise UserError(f"the fake score's bottleneck has shape {tuple(feature.shape)}: "
                            "no GAN head for it", "loss.gan",
                            "Use a UNet or DiT teacher, or loss.gan=false")

    def forward(self, feature: Tensor) -> Tensor:
        if self.tokens:
            feature = self.norm(feature).mean(1)
        return self.body(feature).squeeze(1)


class FakeScore(nn.Module):
    """The online fake-score network: a trainable copy of the teacher denoiser (DMD2 `fake_unet
    = deepcopy(real_unet)`, edm_guidance.py:34-35; SiD's f_psi), with an optional GAN head on
    its bottleneck (the backbone's last stage). `forward(z, t, y, mode)`: "x0" its unguided
    x-prediction, "logit" the discriminator's logit (the denoiser runs to its bottleneck tap)."""

    def __init__(self, teacher: Denoiser, shape: tuple[int, ...], gan: bool):
        super().__init__()
        self.denoiser = copy.deepcopy(teacher).requires_grad_(True).train()
        self.stage = self.denoiser.stages[-1] if self.denoiser.stages else None
        self.head = None
        if gan:
            if self.stage is None:
                raise UserError("the teacher's backbone declares no stages, so the GAN head "
                                "has no bottleneck to read", "loss.gan",
                                "Use a UNet or DiT teacher, or loss.gan=false")
            z = torch.zeros(1, *shape, device=next(teacher.parameters()).device)
            with torch.no_grad(), FeatureTaps(self.denoiser, [self.stage]) as taps:
                self.denoiser(z, float(self.denoiser.process.t_max))
                self.head = DiscriminatorHead(taps[self.stage])

    def forward(self, z: Tensor, t, y: Tensor | None = None, mode: str = "x0") -> Tensor:
        if mode == "x0":
            return self.denoiser.predict(z, t, y, guidance=1.0)[0]
        if mode != "logit" or self.head is None:
            raise ValueError(f"mode must be x0 or logit (with a GAN head), got {mode!r}")
        with FeatureTaps(self.denoiser, [self.stage]) as taps:
            self.denoiser(z, t, y)
            return self.head(taps[self.stage])


def dm_direction(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's per-sample image-space gradient g = (mu_fake - mu_real) / mean_CHW |x - mu_real|
    (DMD2 edm_guidance.py:73-125: p_real - p_fake over w = mean |p_real|, nan_to_num'ed)."""
    w = per_sample_mean((x - real_x0).abs())
    return torch.nan_to_num((fake_x0 - real_x0) / col(w, x))


def surrogate_loss(x: Tensor, direction: Tensor) -> Tensor:
    """0.5 mean_{B,C,H,W} (x - sg(x - g))^2: its gradient with respect to x is g / (B C H W);
    the value itself means nothing (DMD2 `loss_dm`)."""
    return 0.5 * F.mse_loss(x.float(), (x - direction).detach().float())


def gan_loss(real_logit: Tensor | None, fake_logit: Tensor) -> Tensor:
    """DMD2's non-saturating GAN losses (edm_guidance.py:174-219): the discriminator's
    softplus(D(fake)) + softplus(-D(real)) when `real_logit` is given, else the generator's
    softplus(-D(fake)); batch means."""
    if real_logit is None:
        return F.softplus(-fake_logit).mean()
    return F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()


class GeneratorSchedule:
    """Where a K-step generator is trained and how it samples (DMD2 sd_unified_model.py:28-36,
    127-201). K = 1: from t_start (t_max, or SiD's sigma_init) in one evaluation ("onestep").
    K > 1: the times grid(K)[:K] (DMD2's [999, 749, 499, 249] for K = 4 on a 1000-step grid),
    sampled with "consistency" (x0, then fresh noise to the next time: DMD2's inference); each
    training step picks s ~ U{0..K-1} (the same on every rank: a function of (seed, step)) and
    trains at times[s] on an input made by the CURRENT generator from pure noise through times
    [0..s-1] (backward simulation), or by noising the real batch (backward_simulation false)."""

    def __init__(self, steps, backward_simulation: bool = True, start_sigma=None):
        self.steps = positive_int(steps, "loss.generator_steps")
        self.backward_simulation = bool(backward_simulation)
        self.start_sigma = None if start_sigma is None else float(start_sigma)
        if self.start_sigma is not None and (self.steps != 1 or self.start_sigma <= 0):
            raise UserError(f"loss.start_sigma={start_sigma} starts a ONE-step generator below "
                            "t_max; it needs loss.generator_steps=1 and a sigma > 0",
                            "loss.start_sigma", "Use null (t_max) or SiD's 2.5 with one step")

    def configure(self, student: Denoiser, teacher: Denoiser) -> None:
        """The student samples as it is trained: the teacher's process and parameterisation."""
        student.set_diffusion(process=teacher.process, param=teacher.param,
                              sampler="onestep" if self.steps == 1 else "consistency",
                              steps=self.steps, start_sigma=self.start_sigma)

    def times(self, core: Denoiser) -> list[float]:
        if self.steps == 1:
            return [core.start_time()]
        return [float(v) for v in core.process.grid(self.steps)[: self.steps]]

    def stage(self, seed: int, step: int) -> int:
        """s ~ U{0..K-1} for this optimizer step (0 for one step)."""
        if self.steps == 1:
            return 0
        g = torch.Generator().manual_seed(derive_seed("dmd-stage", seed, step))
        return int(torch.randint(0, self.steps, (), generator=g))

    def samples(self, student, batch, draws: SampleDraws, stage: int, grad: bool
                ) -> tuple[Tensor, Tensor]:
        """(x, t): the generator's x-prediction `x` [B, ...] at times[stage] (with a graph when
        `grad`; the student called through its possibly DDP-wrapped forward) and that time.
        Draw order: the pure noise, then one re-noising draw per simulated step."""
        core = unwrap(student)
        process, times = core.process, self.times(core)
        y = batch.y if core.conditional else None
        x_real = batch.x.float()
        eps = draws.normal(*x_real.shape[1:])
        t0 = torch.full((len(draws),), times[0], dtype=torch.float64, device=x_real.device)
        z = col(process.s(t0), x_real) * eps
        if stage > 0 and not self.backward_simulation:   # the real batch, noised to times[s]
            t_s = torch.full_like(t0, times[stage])
            z = noised(process, x_real, t_s, draws.normal(*x_real.shape[1:]))
        elif stage > 0:
            with torch.no_grad():
                for k in range(stage):
                    x_k = core.predict(z, times[k], y, guidance=1.0)[0]
                    t_next = torch.full_like(t0, times[k + 1])
                    z = noised(process, x_k, t_next, draws.normal(*x_real.shape[1:]))
        t = torch.full_like(t0, times[stage])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if grad:
                x = student(z, t, y, output="x_eps")[0]
            else:
                x = core.predict(z, t, y, guidance=1.0)[0]
        return x.float(), t


class DistributionMatching:
    """Base of the distribution-matching objectives (put before NoiseSeeded and CriticObjective
    in the bases). The student, a copy of the teacher, becomes a K-step generator
    (`GeneratorSchedule`); the critic is a `FakeScore` trained online by the teacher's own
    denoising loss on the generator's detached samples (`fake_loss`: a Denoising node, by
    default the dsm of conf/loss/dsm.yaml; DMD2's EDM teacher: edm weighting) plus, with a GAN
    head, the discriminator's loss on noised real and generated images.

    Per optimizer step, draws in this order (SampleDraws: a function of (noise_seed, step,
    sample index)): the generator's noise (+ re-noising draws), then — on a generator turn
    (`step % ratio == 0`, DMD2's dfake_gen_update_ratio) — the generator terms' draws, then
    the critic's: its denoising loss's t and eps, then (GAN) the fake and the real image's
    grid index and noise. Between generator turns the generator runs without a graph to make
    the critic's samples and no generator terms are returned (the student's optimizer changes
    nothing; the logs average each term over the steps that returned it; `gen_turn` says which
    steps trained the generator).
    Terms: loss (the generator's), gen_turn, and the critic's critic_loss, critic_dsm,
    critic_gan / real_logit / fake_logit (GAN)."""

    task_name = "diffusion"
    accepts_soft_targets = False
    batch_coupling = None   # per-sample draws and per-sample terms, batch means
    name = "distribution_matching"

    def init_matching(self, *, ratio=1, generator_steps=1, backward_simulation=True,
                      start_sigma=None, min_step_percent=0.02, max_step_percent=0.98,
                      fake_loss=None, gan=False, gan_generator_weight=0.0,
                      gan_critic_weight=0.0, gan_max_step_percent=1.0,
                      critic_grad_clip=None) -> None:
        self.ratio = positive_int(ratio, "loss.ratio")
        self.schedule = GeneratorSchedule(generator_steps, backward_simulation, start_sigma)
        self.dm_range = check_step_range(min_step_percent, max_step_percent,
                                         "loss.min_step_percent")
        self.gan = bool(gan)
        self.gan_generator_weight = float(gan_generator_weight)
        self.gan_critic_weight = float(gan_critic_weight)
        self.gan_range = check_step_range(0.0, gan_max_step_percent, "loss.gan_max_step_percent")
        if not self.gan and (self.gan_generator_weight or self.gan_critic_weight):
            raise UserError("GAN loss weights are set but loss.gan=false (no head to train)",
                            "loss.gan", "Set loss.gan=true, or the gan_*_weight options to 0")
        node = dict(fake_loss or {})
        node.pop("_target_", None)
        self.fake_loss = Denoising(**{"name": f"{self.name}.fake_loss", **node})
        self.critic_grad_clip = None if critic_grad_clip is None else float(critic_grad_clip)
        self.shape: tuple[int, ...] | None = None
        self.init_noise_seed()

    # ---------------------------------------------------------------- binding
    def bind(self, student, teacher, data) -> None:
        model = check_denoiser(student, "student", self.name)
        t_model = check_denoiser(teacher, "teacher", self.name)
        copy_teacher_weights(model, t_model, self.name)   # DMD2 --initialie_generator
        self.schedule.configure(model, t_model)
        adopt_teacher_guidance(model, t_model)
        self.shape = tuple(data.input_shape)
        self.draw_noise_seed()

    def build_critic(self, teacher) -> nn.Module:
        if self.shape is None:
            raise RuntimeError("build_critic before bind")
        return FakeScore(teacher, self.shape, self.gan)

    # ---------------------------------------------------------------- one step
    def step_terms(self, student, topology, batch, ctx) -> dict[str, Tensor]:
        draws = self.draws(batch, ctx)
        turn = ctx.step % self.ratio == 0
        self.stage = self.schedule.stage(self._noise_seed_host, ctx.step)
        self.on_stage(self.stage, topology)
        x, _ = self.schedule.samples(student, batch, draws, self.stage, grad=turn)
        # between generator turns: no generator terms at all (the topology then backpropagates
        # the critic's loss only; the logs average each term over the steps that returned it)
        terms = self.generator_terms(x, student, topology, batch, draws) if turn else {}
        terms["gen_turn"] = torch.tensor(float(turn), device=x.device)
        terms.update(self.critic_terms(x.detach(), topology.critic, batch, draws))
        return terms

    def on_stage(self, stage: int, topology) -> None:
        """Called once a step with the generator stage it trains (phased DMD: its phase)."""

    def dm_times(self, process, draws: SampleDraws) -> Tensor:
        """[B] the DM loss's noise times: grid indices U{min..max} (phased DMD: its phase's)."""
        return grid_times(process, draws, *self.dm_range)

    def teacher_and_fake(self, topology, z: Tensor, t: Tensor, y) -> tuple[Tensor, Tensor]:
        """mu_real (the frozen teacher, with its classifier-free guidance) and mu_fake
        (unguided) at (z, t), without a graph."""
        with torch.inference_mode():   # the frozen teacher: no autograd bookkeeping at all
            real = topology.model.predict(z, t, y)[0].float()
        with torch.no_grad():
            fake = topology.critic(z, t, y, "x0").float()
        return real.clone(), fake   # (an inference tensor cannot enter an autograd graph)

    def dm_terms(self, x: Tensor, topology, y, draws: SampleDraws) -> dict[str, Tensor]:
        """DMD's distribution-matching surrogate at a grid time U{min..max} (DMD2 :73-125)."""
        process = topology.model.process
        t = self.dm_times(process, draws)
        eps = draws.normal(*x.shape[1:])
        z = noised(process, x.detach(), t, eps)
        real, fake = self.teacher_and_fake(topology, z, t, y)
        g = self.direction(x.detach(), real, fake, z, t, y, topology)
        return {"loss": surrogate_loss(x, g), "dm_grad": g.abs().mean().detach()}

    def direction(self, x, real, fake, z, t, y, topology) -> Tensor:
        """The per-sample image-space gradient; f-distill reweights it."""
        return dm_direction(x, real, fake)

    def generator_gan(self, x: Tensor, critic: FakeScore, y, draws: SampleDraws) -> Tensor:
        """softplus(-D(x_t)) with the critic's parameters detached (DMD2 gen_cls_loss)."""
        process = critic.denoiser.process
        t = grid_times(process, draws, *self.gan_range)
        z = noised(process, x, t, draws.normal(*x.shape[1:]))
        return gan_loss(None, detached_call(critic, z, t, y, mode="logit"))

    def generator_terms(self, x: Tensor, student, topology, batch, draws
                        ) -> dict[str, Tensor]:
        """The generator's terms for its samples `x` (with their graph); `student` is the
        (possibly DDP-wrapped) generator, for methods that run it again (DMD's regression)."""
        y = batch.y if unwrap(topology.model).conditional else None
        terms = self.dm_terms(x, topology, y, draws)
        if self.gan:
            terms["gan_g"] = self.generator_gan(x, topology.critic, y, draws)
            terms["loss"] = terms["loss"] + self.gan_generator_weight * terms["gan_g"]
            terms["gan_g"] = terms["gan_g"].detach()
        return terms

    def critic_terms(self, x: Tensor, critic: FakeScore, batch, draws) -> dict[str, Tensor]:
        """The fake score's denoising loss on the generator's samples (DMD2 :127-172), plus
        the discriminator's GAN loss on noised generated vs real images (:174-219)."""
        y = batch.y if critic.denoiser.conditional else None
        dsm = self.fake_loss.terms(critic.denoiser, x, y, draws)["loss"]
        out = {"critic_dsm": dsm.detach()}
        loss = dsm
        if self.gan:
            process = critic.denoiser.process
            t_f = grid_times(process, draws, *self.gan_range)
            fake = critic(noised(process, x, t_f, draws.normal(*x.shape[1:])), t_f, y, "logit")
            t_r = grid_times(process, draws, *self.gan_range)
            real_x = batch.x.float()
            real = critic(noised(process, real_x, t_r, draws.normal(*x.shape[1:])), t_r, y,
                          "logit")
            d_loss = gan_loss(real, fake)
            loss = loss + self.gan_critic_weight * d_loss
            out.update(critic_gan=d_loss.detach(), real_logit=real.detach().mean(),
                       fake_logit=fake.detach().mean())
        out["critic_loss"] = loss
        return out

    def extra_repr(self) -> str:
        return (f"ratio={self.ratio}, generator_steps={self.schedule.steps}, "
                f"dm_range={self.dm_range}, gan={self.gan}")
