"""Self-distillation with ground-truth guidance (Borup & Andersen, "Even your Teacher Needs
Guidance", 2021) — METHODS.md [code: Kennethborup/self_distillation `self_distiller.py`].

Generation τ of the same architecture (freshly initialised) learns from generation τ−1 and the
labels; `distill_cli.training.generations` runs the generations and picks α per generation
(`auto`). The authors' procedure, reproduced by default:

* every generation, generation 0 included, minimises the SAME loss: generation 0 is the α = 1
  case (MSE of the softmax to the one-hot labels; their `training_step` without a teacher), not
  CE (`gen0: ce` is this project's earlier choice, kept as an option);
* plus their weight penalty `reg_coef·Σ_θ ‖θ‖₂` — the plain (not squared) L2 norm of every
  trainable parameter tensor of the student, summed (`weight_penalty`, their `--reg_coef` 1e-4);
* trained with Adam (their `configure_optimizers`: `torch.optim.Adam(lr)`, default lr 1e-3, no
  weight decay, no learning-rate schedule) — `optimizer` / `scheduler`, which the generations
  runner installs in every generation;
* the next generation's teacher is the previous generation's FINAL model (`teacher = model` after
  `trainer.fit`), not its best checkpoint (`teacher_weights`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_pair, label_distribution

GEN0 = ("mse", "ce")
TEACHER_WEIGHTS = ("last", "best")


def check_procedure(gen0, weight_penalty, teacher_weights) -> None:
    """The generation options (also checked by the generations runner before any training)."""
    if gen0 not in GEN0:
        raise UserError(f"self-distillation gen0={gen0!r} is not an option", "loss.gen0",
                        "Use mse (the authors: generation 0 minimises the same MSE at alpha=1) "
                        "or ce")
    if isinstance(weight_penalty, bool) or not isinstance(weight_penalty, (int, float)) \
            or not float(weight_penalty) >= 0:
        raise UserError(f"weight_penalty must be a number >= 0, got {weight_penalty!r}",
                        "loss.weight_penalty", "Use 1e-4 (the authors' reg_coef) or 0 (off)")
    if teacher_weights not in TEACHER_WEIGHTS:
        raise UserError(f"teacher_weights={teacher_weights!r} is not an option",
                        "loss.teacher_weights",
                        "Use last (the authors: the previous generation's final model) or best")


def weight_norm_sum(model: torch.nn.Module) -> torch.Tensor:
    """`Σ_θ ‖θ‖₂` over the trainable parameter tensors (the authors' `sum(torch.norm(p))`; the
    gradient of a norm at an all-zero tensor is 0, as torch's)."""
    return torch.stack([torch.linalg.vector_norm(p.float()) for p in model.parameters()
                        if p.requires_grad]).sum()


class SelfDistill(Objective):
    """`α·MSE(softmax(s), onehot(y)) + (1−α)·MSE(softmax(s), softmax(t)) + weight_penalty·Σ‖θ‖₂`.

    MSE on PROBABILITIES (T = 1), element mean over `[B, C]` (`F.mse_loss` default) — the
    authors' code; α weights the GROUND TRUTH (α = 1: labels only, α = 0: teacher only). No CE.
    At α = 1 no teacher is needed (`needs_teacher` is False): that is generation 0.
    Targets: `[B]` labels, or `[B, C]` label distributions (mixup) used as the label target.
    The weight penalty is added in `train_terms` (it needs the student's parameters); a direct
    call with logits computes the MSE part.

    `gen0`, `optimizer`, `scheduler` and `teacher_weights` are settings of the generations
    runner (training/generations.py), kept here so that one node holds the procedure.

    Terms: `loss`; `label_mse`, `teacher_mse` (before their weights; `teacher_mse` only with a
    teacher), `weight_norm` (Σ‖θ‖₂ before `weight_penalty`, when it is > 0). Teacher logits
    detached.
    """

    def __init__(self, alpha: float = 0.5, gen0: str = "mse", weight_penalty: float = 1e-4,
                 teacher_weights: str = "last", optimizer=None, scheduler=None):
        super().__init__()
        if alpha == "auto":
            raise UserError("alpha=auto chooses α per generation, so it needs generations",
                            "self_distill.alpha", "Set self_distill.generations>=1, or give a "
                            "number in [0, 1]")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0.0 <= float(alpha) <= 1.0:
            raise UserError(f"self-distillation alpha must be in [0, 1] (or auto), got {alpha!r}",
                            "self_distill.alpha", "Use e.g. 0.5, or auto")
        check_procedure(gen0, weight_penalty, teacher_weights)
        self.alpha = float(alpha)
        self.needs_teacher = self.alpha < 1.0   # α = 1 (generation 0) trains on labels only
        self.gen0, self.teacher_weights = gen0, teacher_weights
        self.weight_penalty = float(weight_penalty)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        if self.needs_teacher or teacher_logits is not None:
            check_pair(student_logits, teacher_logits)
        p = F.softmax(as_float(student_logits), dim=1)
        y = label_distribution(targets, p.shape[0], p.shape[1], p.dtype)
        label_mse = F.mse_loss(p, y)
        terms = {"label_mse": label_mse.detach()}
        loss = self.alpha * label_mse
        if teacher_logits is not None:
            teacher_mse = F.mse_loss(p, F.softmax(as_float(teacher_logits).detach(), dim=1))
            loss = loss + (1 - self.alpha) * teacher_mse
            terms["teacher_mse"] = teacher_mse.detach()
        return {"loss": loss, **terms}

    def train_terms(self, student, forward, teacher, batch, ctx: StepContext
                    ) -> dict[str, torch.Tensor]:
        terms = super().train_terms(student, forward, teacher, batch, ctx)
        if self.weight_penalty > 0:
            norm = weight_norm_sum(student)
            terms["loss"] = terms["loss"] + self.weight_penalty * norm
            terms["weight_norm"] = norm.detach()
        return terms

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gen0={self.gen0}, weight_penalty={self.weight_penalty}, "
                f"teacher_weights={self.teacher_weights}")
