"""Adversarial training with cross-entropy (Madry et al., ICLR 2018, "Towards Deep Learning
Models Resistant to Adversarial Attacks"): the robust model — e.g. MTARD's robust teacher,
trained through the same runner and teacher store."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.evaluation.adversarial import NormalizedModel, check_attack, pgd, pixel_stats
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext, StepObjective
from distill_cli.losses.ce import _as_float


ATTACK_BN = ("train", "eval")


class KeepMode(nn.Module):
    """`model` as it is, whatever `.train()` / `.eval()` its holder calls: `pgd` puts the model it
    attacks in eval mode (evaluation/adversarial.py `eval_mode`), and Madry's attack needs the
    student's training-mode graph. The wrapped modules' own flags are untouched (`pgd` restores
    every module's flag after the attack, and they never changed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "KeepMode":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AdversarialCE(StepObjective):
    """`adv_weight·CE(f(x_adv), y) + clean_weight·CE(f(x), y)`, batch means, no teacher.

    `x_adv` = PGD L∞ (distill_cli/adversarial.py) against the model being trained, on the same
    batch, in [0, 1] pixel space: `steps` sign-gradient steps of `step_size` on CE, ε-ball ∩ [0, 1]
    projection after each, `random_start` uniform in the ε-ball. `attack_bn` is the mode of the
    model WHILE it is attacked:
      "train" (default, Madry et al.): the attack runs on the training-mode graph, as Madry's
          cifar10_challenge (`Model(mode='train')` is the graph `LinfPGDAttack` differentiates;
          its BatchNorm has `is_training=True, updates_collections=None`): BatchNorm normalises
          with each attack batch's own statistics and its running averages move on every attack
          forward, as theirs do;
      "eval" (ours, before): BatchNorm uses its running statistics and nothing is updated
          during the attack (MTARD's choice for its student, see losses/mtard.py).
    The loss forward is in train mode either way. Madry's objective is the adversarial term
    alone (`clean_weight: 0`, the default — then the clean forward is skipped); `clean_weight > 0` mixes in clean CE
    (Goodfellow et al. 2015's 50/50 mix is `adv_weight: 0.5, clean_weight: 0.5`), never TRADES' KL.
    `label_smoothing` (torch's ε) applies to both CE terms; 0 = plain CE. It exists so that a
    teacher-store loss written over the CE default (`teacher.train.loss`) merges cleanly.

    Forward can also be called with logits (then `student_logits` are taken as the adversarial
    logits; tests and logit-only callers). Terms: `loss`; `adv_ce`; `clean_ce` when
    `clean_weight > 0`. The attack's start noise draws from the global torch RNG (checkpointed by
    the engine, so a resumed run is bit-exact).
    """

    batch_coupling = "its PGD attack runs extra forward/backward passes of the student"
    needs_teacher = False

    def __init__(self, eps=8 / 255, step_size=2 / 255, steps: int = 10,
                 random_start: str | None = "uniform", adv_weight: float = 1.0,
                 clean_weight: float = 0.0, label_smoothing: float = 0.0,
                 attack_bn: str = "train"):
        super().__init__()
        if attack_bn not in ATTACK_BN:
            raise UserError(f"adv_ce attack_bn={attack_bn!r} is not an option", "loss.attack_bn",
                            "Use train (Madry: the training-mode graph) or eval")
        self.attack_bn = attack_bn
        self.eps, self.step_size, self.steps = check_attack(eps, step_size, steps, random_start,
                                                            "loss")
        self.random_start = random_start
        for key, value in (("adv_weight", adv_weight), ("clean_weight", clean_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"adv_ce {key} must be a number >= 0, got {value!r}",
                                f"loss.{key}", "Use e.g. adv_weight=1 clean_weight=0 (Madry)")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}",
                            "loss.label_smoothing", "Use 0.0 (plain CE)")
        self.adv_weight, self.clean_weight = float(adv_weight), float(clean_weight)
        self.label_smoothing = float(label_smoothing)
        self._pixels: tuple | None = None

    def bind(self, student, teacher, data) -> None:
        self._pixels = pixel_stats(data.train, "loss")   # a UserError before training starts

    def _ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_as_float(logits), targets, label_smoothing=self.label_smoothing)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None, *,
                clean_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        adv = self._ce(student_logits, targets)
        terms = {"adv_ce": adv.detach()}
        loss = self.adv_weight * adv
        if self.clean_weight > 0:
            clean = self._ce(student_logits if clean_logits is None else clean_logits, targets)
            loss = loss + self.clean_weight * clean
            terms["clean_ce"] = clean.detach()
        return {"loss": loss, **terms}

    def step_terms(self, student, teacher, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self._pixels is None:
            raise RuntimeError("AdversarialCE.bind(student, teacher, data) was not called")
        model = NormalizedModel(student, *self._pixels, batch.x.device)
        x01 = model.pixels(batch.x)
        attacked = model if self.attack_bn == "eval" else NormalizedModel(
            KeepMode(student), *self._pixels, batch.x.device)
        x_adv01 = pgd(attacked, x01, batch.y, self.eps, self.step_size, self.steps,
                      self.random_start)
        adv_logits = model(x_adv01).float()   # train mode (pgd restored it)
        clean_logits = student(batch.x).float() if self.clean_weight > 0 else None
        return self(adv_logits, None, batch.y, ctx, clean_logits=clean_logits)

    def extra_repr(self) -> str:
        return (f"eps={self.eps:.5f}, step_size={self.step_size:.5f}, steps={self.steps}, "
                f"random_start={self.random_start}, adv_weight={self.adv_weight}, "
                f"clean_weight={self.clean_weight}, label_smoothing={self.label_smoothing}, "
                f"attack_bn={self.attack_bn}")
