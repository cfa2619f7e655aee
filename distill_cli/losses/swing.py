"""Swing-inspired privacy-preserving KD — METHODS.md "Swing distillation" [abstract].

Only the abstract was available ("a per-sample temperature driven by a privacy score, and noise
added to the soft targets"), so everything concrete below is OUR design, labelled
"Swing-inspired"; it is not the authors' method and results must not be reported as theirs.
Measure what it buys with `distill_cli.evaluation.privacy.membership_auc` (membership inference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill_cli.seeding import derive_seed
from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import (as_float, check_pair, kl_from_log_probs,
                                           label_distribution, soft_cross_entropy)

NOISE_KINDS = ("gaussian", "laplace")


def privacy_score(teacher_logits: torch.Tensor, label_dist: torch.Tensor) -> torch.Tensor:
    """`[B]` in [0, 1]: the (clean, T=1) teacher's probability of the label, `Σ_c y_c·p_t,c`
    (= `p_t,y` for hard labels). High = confidently fitted = memorised-looking. Detached."""
    return (F.softmax(teacher_logits.detach(), dim=1) * label_dist).sum(dim=1).detach()


def per_sample_temperature(score: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """`T_i = t_min + (t_max − t_min)·score_i` (`[B]`, detached): the more memorised-looking a
    sample, the softer (less label-revealing) its target."""
    return (t_min + (t_max - t_min) * score).detach()


def noise_generator(noise_seed: int, step: int) -> torch.Generator:
    """CPU generator of the noise of global step `step`:
    `derive_seed("swing", noise_seed, step)`."""
    return torch.Generator().manual_seed(derive_seed("swing", noise_seed, step))


def logit_noise(shape: torch.Size, kind: str, std: float, generator: torch.Generator
                ) -> torch.Tensor:
    """Float32 CPU noise of standard deviation `std`: Gaussian `N(0, std²)`, or Laplace with scale
    `b = std/√2` (same std; drawn as `b·(E1 − E2)`, E ~ Exp(1) = `−log1p(−U)`, always finite)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator) * std
    e1 = -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64))
    e2 = -torch.log1p(-torch.rand(shape, generator=generator, dtype=torch.float64))
    return ((e1 - e2) * (std / math.sqrt(2.0))).float()


class Swing(Objective):
    """Swing-inspired KD (our design, METHODS.md [abstract]):

        score_i = p_t,y_i = softmax(t_i)[y_i]            (clean teacher, T = 1, detached)
        T_i     = t_min + (t_max − t_min)·score_i         (detached)
        q_i     = softmax((t_i + ε_i) / T_i),  ε_i ~ N(0, noise_std²) or Laplace(std noise_std)
        loss    = ce_weight·CE(s, y) + kd_weight·mean_i T_i²·KL(q_i ‖ softmax(s_i / T_i))

    (a) Privacy score → temperature: samples the teacher fits confidently (the ones a membership
    attack exploits) get a higher temperature, so their soft target reveals less about the
    teacher's exact confidence; T_i² keeps the KL's gradient scale comparable across samples
    (Hinton's T²). (b) Noise: added to the teacher LOGITS before the tempered softmax, so the soft
    target stays a distribution; it is drawn from a CPU generator seeded by
    `derive_seed("swing", noise_seed, ctx.step)` — a pure function of the step, so runs (and
    resumed runs) are reproducible and every step gets fresh noise. Without `ctx` (evaluation,
    direct calls) NO noise is added: the loss is deterministic. This is a heuristic, not a
    differential-privacy guarantee.

    Identities: `t_min = t_max = T` with `noise_std = 0` is Hinton KD at temperature T with the
    same weights. Targets: `[B]` labels, or `[B, C]` label distributions (mixup: the score is
    then `Σ_c y_c·p_t,c` and CE the soft CE).

    Terms: `loss`; `ce` (before ce_weight); `kd` (mean T_i²·KL, before kd_weight);
    `mean_temperature`. The teacher logits are detached.
    """

    batch_coupling = "its logit noise is drawn for the whole batch at once"
    needs_teacher = True
    uses_labels = True
    measures_privacy = True  # eval.mia=auto → membership inference in the summary

    def __init__(self, t_min: float = 1.0, t_max: float = 8.0, noise_std: float = 0.5,
                 noise: str = "gaussian", noise_seed: int = 0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9):
        super().__init__()
        if not float(t_min) > 0:
            raise UserError(f"Swing t_min must be > 0, got {t_min}", key="loss.t_min",
                            fix="use e.g. t_min=1")
        if not float(t_max) >= float(t_min):
            raise UserError(f"Swing t_max must be >= t_min ({t_min}), got {t_max}",
                            key="loss.t_max", fix="use e.g. t_min=1, t_max=8")
        if not float(noise_std) >= 0:
            raise UserError(f"Swing noise_std must be >= 0, got {noise_std}",
                            key="loss.noise_std", fix="use 0 for no noise, e.g. 0.5")
        if noise not in NOISE_KINDS:
            raise UserError(f"Swing noise must be one of {list(NOISE_KINDS)}, got {noise!r}",
                            key="loss.noise")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise UserError(f"Swing noise_seed must be an integer, got {noise_seed!r}",
                            key="loss.noise_seed")
        for name, v in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if not float(v) >= 0:
                raise UserError(f"Swing {name} must be >= 0, got {v}", key=f"loss.{name}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.noise_std, self.noise, self.noise_seed = float(noise_std), noise, int(noise_seed)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        s = as_float(student_logits)
        t = as_float(teacher_logits).detach()
        y = label_distribution(targets, s.shape[0], s.shape[1], s.dtype)
        temp = per_sample_temperature(privacy_score(t, y), self.t_min, self.t_max)  # [B]
        if ctx is not None and self.noise_std > 0:
            eps = logit_noise(t.shape, self.noise, self.noise_std,
                              noise_generator(self.noise_seed, ctx.step))
            t = t + eps.to(device=t.device, dtype=t.dtype)
        T = temp.unsqueeze(1)
        kl = kl_from_log_probs(F.log_softmax(t / T, dim=1), F.log_softmax(s / T, dim=1))
        kd = (temp * temp * kl).mean()
        ce = (F.cross_entropy(s, targets) if not targets.is_floating_point()
              else soft_cross_entropy(s, y).mean())
        loss = self.ce_weight * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(),
                "mean_temperature": temp.mean().detach()}

    def extra_repr(self) -> str:
        return (f"t_min={self.t_min}, t_max={self.t_max}, noise={self.noise}, "
                f"noise_std={self.noise_std}, noise_seed={self.noise_seed}, "
                f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}")
