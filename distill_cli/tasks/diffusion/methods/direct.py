"""Knowledge distillation of the whole ODE map — Luhman & Luhman 2021, "Knowledge distillation
in iterative generative models for improved sampling speed" (the Denoising Student),
METHODS_FAMILIES.md A4; source tcl9876/Denoising_Student@07f4ad7f (LL)."""
from __future__ import annotations

import torch
from torch import Tensor

from distill_cli.errors import UserError
from distill_cli.losses.base import StepObjective
from distill_cli.models.diffusion.samplers import initial_noise
from distill_cli.tasks.diffusion.methods.common import (
    StoredPairs,
    adopt_teacher_guidance,
    check_denoiser,
    copy_teacher_weights,
    pair_batch,
    unwrap,
)

PARAMS = ("x0", "v", "eps", "edm", "velocity")


def quantise(x: Tensor) -> Tensor:
    """LL's stored targets: clip to [-1, 1], to uint8 by TRUNCATION (`float_to_image`,
    utils.py:88-91: x*127.5 + 127.5, astype('uint8')), back with /127.5 - 1 (training.py:13-17)."""
    return torch.floor(x.clamp(-1.0, 1.0) * 127.5 + 127.5) / 127.5 - 1.0


class Direct(StoredPairs, StepObjective):
    """The student maps the teacher's initial noise to the teacher's ODE endpoint in ONE
    evaluation.

    Per batch (LL training.py:39-60, :122-125; models.py:294-301):
        (ε, x) = the teacher's pair of each training sample (pairs.get(batch.index)),
        x <- quantise(x) with quantise_targets (LL stores 8-bit teacher outputs)
        z = initial_noise(process, ε) = s(t_max) ε;  x̂ = the student's x̂ at (z, t_max)
        l1 (LL's CIFAR-10 setting): L = Σ_pixels |x̂ - x| / B
        l2 (LL's other datasets):   L = Σ_pixels (x̂ - x)² / B
    (a sum over C·H·W, a mean over the batch). The student starts from the teacher's weights
    (LL: same architecture, teacher initialisation) and samples with "onestep".

    Choices that differ from the authors:
    - x̂ is the student's own parameterisation at t_max (LL: a residual read-out x̂ = z - F(z,
      999) of an ε-network, no α/σ rescaling). An ε-parameterised student would divide by
      a(t_max) (4.5e-5 on vp_cosine) and is refused: set loss.param=x0 or v (its weights still
      start from the teacher, read out another way, as LL's residual read-out does).
    - the pairs come from the teacher's own sampler and steps (the pairs node; LL: 100 DDIM
      steps with quadratic spacing) and are the run's training-set pairs, one per sample.
    - a guided teacher's pairs give a student sampled at w = 1.
    Nothing is drawn at random (the noise is the pair's), so unlike the other methods it has no
    `noise_seed`: a torchrun run computes what one process computes as it is.
    Terms: loss, pixel_mae (mean |x̂ - x| per pixel, whatever the distance).
    """

    task_name = "diffusion"
    batch_coupling = None
    name = "direct"

    def __init__(self, distance: str = "l1", quantise_targets: bool = True, param=None,
                 pairs=None):
        super().__init__()
        if distance not in ("l1", "l2"):
            raise UserError(f"unknown distance {distance!r}", "loss.distance",
                            "Use l1 (LL's CIFAR-10 setting) or l2 (their other datasets)")
        if param is not None and param not in PARAMS:
            raise UserError(f"unknown parameterisation {param!r}", "loss.param",
                            f"Use null (the teacher's) or one of: {', '.join(PARAMS)}")
        self.distance, self.quantise_targets, self.param = distance, bool(quantise_targets), param
        self.init_pairs(pairs)

    def bind(self, student, teacher, data) -> None:
        model = check_denoiser(student, "student", self.name)
        t_model = check_denoiser(teacher, "teacher", self.name)
        copy_teacher_weights(model, t_model, self.name)
        param = self.param or t_model.param
        model.set_diffusion(process=t_model.process, param=param, sampler="onestep", steps=1)
        a_max = float(model.process.a(model.process.t_max))
        if param == "eps" and a_max < 0.05:
            raise UserError(
                f"an eps-parameterised one-step student divides its prediction by a(t_max) = "
                f"{a_max:.2g} on process {model.process.name}", "loss.param",
                "Set loss.param=x0 or v: the student keeps the teacher's weights and reads its "
                "output as x0 / v (Luhman & Luhman read theirs as z - F(z))")
        adopt_teacher_guidance(model, t_model)

    def step_terms(self, student, teacher, batch, ctx):
        model = unwrap(student)
        noise, x = pair_batch(self, batch, batch.x.dtype)
        if self.quantise_targets:
            x = quantise(x)
        z = initial_noise(model.process, noise).to(x.dtype)
        x_hat = student(z, model.process.t_max, batch.y,   # the (DDP-)wrapped student
                        output="x_eps")[0].to(x.dtype)
        diff = (x_hat - x).flatten(1)
        per = diff.abs().sum(1) if self.distance == "l1" else (diff ** 2).sum(1)
        return {"loss": per.mean(), "pixel_mae": diff.abs().mean().detach()}

    def extra_repr(self) -> str:
        return (f"distance={self.distance}, quantise_targets={self.quantise_targets}, "
                f"param={self.param}")
