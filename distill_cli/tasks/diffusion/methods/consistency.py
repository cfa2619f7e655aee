"""Consistency distillation (CD) and consistency training (CT), Song et al. ICML 2023,
METHODS_FAMILIES.md A2; source openai/consistency_models@e32b69ee (CM) and, for the CIFAR-10
settings, openai/consistency_models_cifar10@d086e77d (CM10)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill_cli.draws import NoiseSeeded
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext, StepObjective
from distill_cli.models.diffusion.noise import build_process
from distill_cli.tasks.diffusion.methods.common import (
    adopt_teacher_guidance,
    check_denoiser,
    check_distance,
    copy_teacher_weights,
    distance,
    frozen_copy,
    positive_int,
    unwrap,
)

DISTANCES = ("pseudo_huber", "l2", "l1")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> Tensor:
    """CM's grid (karras_diffusion.py:174-186), float64: sigma_i = (sigma_max^(1/rho) +
    i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1, i = 0 is sigma_max."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


def rng_state(device: torch.device) -> tuple:
    """The default RNG state that a forward's dropout draws from (CPU, and the CUDA device)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ConsistencyDistillation(NoiseSeeded, StepObjective):
    """Consistency distillation: the student f_θ maps any point of the teacher's PF-ODE
    trajectory to its start; f_θ is trained to agree at adjacent grid points.

    Per example (CM cm/karras_diffusion.py:106-239 `consistency_losses`; train_util.py:511):
        sigma_i: N-point Karras grid (`karras_sigmas`, i = 0 is sigma_max), n ~ U{0..N-2},
        t = sigma_n, t2 = sigma_{n+1}, z ~ N(0, I), x_t = x + t z
        D(.) = teacher.x0_sigma (the teacher's x̂ at VE level sigma: ANY teacher process)
        d = (x_t - D(x_t, t))/t, x' = x_t + (t2 - t) d, d' = (x' - D(x', t2))/t2
        x̂_{t2} = x_t + (t2 - t)(d + d')/2                           (one Heun step, no grad)
        L = d( f_θ(x_t, t), sg(f_θ⁻(x̂_{t2}, t2)) ),  loss = batch mean (weighting uniform,
        as every CM launch script)
    f = the student's x0_sigma with the 'consistency' parameterisation: c_skip = sd²/((σ -
    σ_min)² + sd²), c_out = (σ - σ_min) sd / sqrt(σ² + sd²), so f(x, σ_min) = x exactly.
    The online and target passes share the dropout RNG state (CM :190-198) and the target runs
    in the student's train/eval mode (CM keeps it in train mode, cm_train.py:109). Dropout
    masks come from the DEFAULT RNG, which every torchrun rank seeds alike: with dropout > 0
    they are per rank, and a multi-rank run is then not the one-process run (without dropout
    it is). After each optimizer step θ⁻ <- μ θ⁻ + (1 - μ) θ (CM train_util.py:403-414); θ⁻
    lives in `self.target`, a frozen copy whose tensors are buffers (checkpointed, never
    trained).
    Draws, per sample from `SampleDraws(noise_seed, step, batch.index)` (methods/common.py:
    one stream per (seed, step, sample), so torchrun ranks holding slices of the global batch
    draw what one process draws), in this fixed order: n (one integer), then z (N(0, I) of the
    image's shape). `noise_seed` is a buffer drawn once in `bind` from the default RNG.

    Student: set_diffusion(process=edm(sigma_min, sigma_max, rho), param="consistency",
    sampler="consistency", steps=1). CD starts it (and θ⁻) from the teacher's weights (CM
    cm_train.py:91-92, :114-115). For an EDM-preconditioned teacher that is CM's own
    situation: the backbone F sees the same inputs and only c_skip/c_out change near σ_min.
    For a VP / flow teacher (eps, v, velocity params, time input 1000 t) the copied weights
    see other inputs (c_in x_σ and log(σ)/4) and produce another quantity: the copy is then a
    warm start of the features, not of the function.

    Defaults and choices (cited in conf/loss/consistency.yaml):
    - N = 18 (CM10 CIFAR-10 CD), μ = 0 (CM10 CIFAR-10 CD: target = sg(online weights), CM10
      losses.py:893-896; ImageNet-64/LSUN use 0.95, set loss.mu=0.95). Our datasets are
      CIFAR-sized, and Song & Dhariwal 2023 also drop the EMA target.
    - distance pseudo_huber (not CM's LPIPS: its VGG weights cannot be downloaded offline).
    - σ grid from this objective's sigma_min/sigma_max/rho (CM: 0.002/80/7), and the
      student's edm process is built with the same values, so f's boundary σ_min is the grid's.
    - the network's time input is the Denoiser's log(σ)/4 (CM: 250 log σ = 1000 x ours).
    - the teacher runs at its own guidance; a guided teacher gives a student sampled at w = 1.
    - with a vp_linear teacher, σ_min = 0.002 lies below its t_min (σ ≈ 0.0105): the teacher
      is evaluated slightly outside its training range there (raise loss.sigma_min to avoid).
    Terms: loss, distance, N, mu.
    """

    task_name = "diffusion"
    batch_coupling = None
    needs_teacher = True
    name = "consistency"

    def __init__(self, scales: int = 18, mu: float = 0.0, distance: str = "pseudo_huber",
                 huber_c: float | None = None, weighting: str = "uniform",
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 init_from_teacher: bool = True):
        super().__init__()
        self.scales = positive_int(scales, "loss.scales")
        if self.scales < 2:
            raise UserError(f"the consistency grid needs N >= 2 points, got {self.scales}",
                            "loss.scales", "Use CM's N = 18 (CIFAR-10) or 40 (ImageNet 64)")
        self.mu = _fraction(mu, "loss.mu")
        self._common(distance, huber_c, weighting, sigma_min, sigma_max, rho)
        self.init_from_teacher = bool(init_from_teacher)

    def _common(self, distance, huber_c, weighting, sigma_min, sigma_max, rho) -> None:
        self.distance = check_distance(str(distance), DISTANCES)
        self.huber_c = None if huber_c is None else float(huber_c)
        if self.huber_c is not None and not (self.huber_c > 0 and math.isfinite(self.huber_c)):
            raise UserError(f"huber_c must be a number > 0, got {huber_c}", "loss.huber_c",
                            "Use null (0.00054 sqrt(d), Song & Dhariwal 2023)")
        if weighting != "uniform":
            raise UserError(f"unknown weighting {weighting!r}", "loss.weighting",
                            "Use uniform (every CM launch script)")
        self.weighting = weighting
        # the process validates the three numbers (UserError key task.process there)
        self.process = build_process("edm", sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.sigma_min, self.sigma_max, self.rho = (self.process.sigma_min,
                                                    self.process.sigma_max, self.process.rho)
        self.target = None
        self._student: list = []   # a reference for after_step, NOT a registered submodule
        self.init_noise_seed()

    # ---- setup ------------------------------------------------------------------------------
    def bind(self, student, teacher, data) -> None:
        model = check_denoiser(student, "student", self.name)
        if self.needs_teacher:
            t_model = check_denoiser(teacher, "teacher", self.name)
            if self.init_from_teacher:
                copy_teacher_weights(model, t_model, self.name)
            adopt_teacher_guidance(model, t_model)
        model.set_diffusion(process=self.process, param="consistency", sampler="consistency",
                            steps=1)
        self.target = frozen_copy(model)
        self._student = [model]
        self.draw_noise_seed()

    def schedule(self, ctx: StepContext) -> tuple[int, float]:
        """(N, μ) of optimizer step ctx.step: fixed for CD."""
        return self.scales, self.mu

    # ---- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def solver(self, teacher, x: Tensor, x_t: Tensor, t: Tensor, t2: Tensor, z: Tensor,
               y) -> Tensor:
        """x̂_{t2}: one Heun step of the teacher's PF-ODE in σ space (CM :143-160)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        tc, t2c = t.to(x.dtype).view(shape), t2.to(x.dtype).view(shape)
        d = (x_t - teacher.x0_sigma(x_t, t, y).to(x.dtype)) / tc
        x_next = x_t + (t2c - tc) * d
        d_next = (x_next - teacher.x0_sigma(x_next, t2, y).to(x.dtype)) / t2c
        return x_t + (t2c - tc) * (d + d_next) / 2

    def step_terms(self, student, teacher, batch, ctx):
        model = unwrap(student)
        x, y = batch.x, batch.y
        n_scales, mu = self.schedule(ctx)
        sigmas = karras_sigmas(n_scales, self.sigma_min, self.sigma_max, self.rho, x.device)
        draws = self.draws(batch, ctx)     # the order below is the docstring's
        n = draws.integers(n_scales - 1)
        z = draws.normal(*x.shape[1:], dtype=x.dtype)
        t, t2 = sigmas[n], sigmas[n + 1]
        x_t = x + t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * z
        dropout = rng_state(x.device)
        # through the (possibly DDP-wrapped) student: its gradients are averaged over ranks
        online = student(x_t, t, y, output="x0_sigma").to(x.dtype)
        x_t2 = self.solver(unwrap(teacher) if teacher is not None else None, x, x_t, t, t2, z, y)
        set_rng_state(dropout, x.device)     # the target pass draws the same dropout masks
        self.target.train(model.training)
        with torch.no_grad():
            goal = self.target.x0_sigma(x_t2, t2, y, guidance=1.0).to(x.dtype)
        dist = distance(online, goal, self.distance, self.huber_c)
        return {"loss": dist.mean(), "distance": dist.mean().detach(),
                "N": torch.tensor(float(n_scales), device=x.device),
                "mu": torch.tensor(float(mu), device=x.device)}

    @torch.no_grad()
    def after_step(self, terms, ctx: StepContext) -> None:
        """θ⁻ <- μ θ⁻ + (1 - μ) θ over the student's parameters (μ of this step: CM updates
        with ema_scale_fn(global_step) before incrementing it); its other buffers are copied.
        μ = 0 copies θ exactly (0·θ⁻ + 1·θ)."""
        if not self._student:
            return
        _, mu = self.schedule(ctx)
        model = self._student[0]
        target = dict(self.target.named_buffers())
        params = dict(model.named_parameters())
        names = list(params)
        torch._foreach_mul_([target[k] for k in names], mu)
        torch._foreach_add_([target[k] for k in names], [params[k].detach() for k in names],
                            alpha=1.0 - mu)
        for name, buf in model.named_buffers():
            target[name].copy_(buf)

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, mu={self.mu}, distance={self.distance}, "
                f"sigma=[{self.sigma_min}, {self.sigma_max}], rho={self.rho}")


class ConsistencyTraining(ConsistencyDistillation):
    """Consistency training: CD without a teacher (CM `consistency_losses` with
    teacher_model=None, :163-172; CM10 'dsm_target'): the teacher's Heun step is replaced by
    x̂_{t2} = x + t2 z with the SAME z (an Euler step whose denoiser is the clean x). The
    student starts from scratch (CM10 cifar10_ve_ct_adaptive.py:21, finetune=False).

    Adaptive schedules (CM cm/script_util.py:186-197 `create_ema_and_scales_fn`, 'adaptive' /
    'progressive'; the code's version, not the paper's), k = ctx.step, K = ctx.total_steps:
        N = ceil(sqrt(k/K ((s1+1)² - s0²) + s0²) - 1);  N = max(N, 1)
        μ = exp(s0 log μ0 / N);  N = N + 1
    (at k = 0, s0 = 2: N = 2, μ = μ0² = 0.81; the paper's form divides by N + 1.)
    Defaults s0 = 2, s1 = 150, μ0 = 0.9 (CM10 CIFAR-10 CT). Everything else as CD
    (distance pseudo_huber in place of CM's LPIPS). Terms: loss, distance, N, mu.
    """

    needs_teacher = False
    name = "consistency_training"

    def __init__(self, s0: int = 2, s1: int = 150, mu0: float = 0.9,
                 distance: str = "pseudo_huber", huber_c: float | None = None,
                 weighting: str = "uniform", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0):
        StepObjective.__init__(self)
        self.s0, self.s1 = positive_int(s0, "loss.s0"), positive_int(s1, "loss.s1")
        if self.s1 < self.s0:
            raise UserError(f"the grid grows from s0 to s1 points, but s1={s1} < s0={s0}",
                            "loss.s1", "Use CM's s0=2 s1=150 (CIFAR-10) or s1=200 (ImageNet)")
        self.mu0 = _fraction(mu0, "loss.mu0")
        self._common(distance, huber_c, weighting, sigma_min, sigma_max, rho)

    def schedule(self, ctx: StepContext) -> tuple[int, float]:
        frac = ctx.step / max(ctx.total_steps, 1)
        n = math.ceil(math.sqrt(frac * ((self.s1 + 1) ** 2 - self.s0 ** 2) + self.s0 ** 2) - 1)
        n = max(n, 1)
        mu = math.exp(self.s0 * math.log(self.mu0) / n) if self.mu0 > 0 else 0.0
        return n + 1, mu

    def solver(self, teacher, x, x_t, t, t2, z, y):
        return x + t2.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * z

    def extra_repr(self) -> str:
        return (f"s0={self.s0}, s1={self.s1}, mu0={self.mu0}, distance={self.distance}, "
                f"sigma=[{self.sigma_min}, {self.sigma_max}], rho={self.rho}")


def _fraction(value, key: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise UserError(f"{key.split('.')[-1]} is an EMA rate in [0, 1), got {value}", key,
                        "Use e.g. 0 (CM10 CIFAR-10 CD) or 0.95 (CM ImageNet 64)")
    return value
