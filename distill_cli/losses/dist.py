"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022), as
METHODS.md "DIST" [code: hunto/DIST_KD `classification/lib/models/losses/dist_kd.py`]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_labels, check_pair, pearson

PEARSON_EPS = 1e-8  # the official `pearson_correlation(a, b, eps=1e-8)`


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
               eps: float = PEARSON_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inter, intra)` relation distances, scalars, WITHOUT τ² or weights; `y = softmax(z/τ)`:

    inter = 1 − mean_i Pearson(y_s[i, :], y_t[i, :])   (each sample across classes)
    intra = 1 − mean_c Pearson(y_s[:, c], y_t[:, c])   (each class across the batch)

    Pearson = cosine of the mean-centred vectors with `+eps` in the denominator (official).
    The teacher is detached. intra needs B > 1 (a column of one sample has no variance).
    """
    y_s = F.softmax(as_float(student_logits) / tau, dim=1)
    y_t = F.softmax(as_float(teacher_logits).detach() / tau, dim=1)
    inter = 1 - pearson(y_s, y_t, eps).mean()
    intra = 1 - pearson(y_s.t(), y_t.t(), eps).mean()
    return inter, intra


class DIST(Objective):
    """DIST: `ce_weight·CE(s, y) + τ²·(beta·inter + gamma·intra)`, as the official code.

    `y = softmax(z/τ)` on both sides; inter = 1 − mean over samples of Pearson(y_s,i·, y_t,i·)
    (inter-class relation, per sample across classes); intra = 1 − mean over classes of
    Pearson(y_s·c, y_t·c) (intra-class relation, per class across the batch). Pearson is the
    cosine of the centred vectors, `⟨a', b'⟩/(‖a'‖‖b'‖ + 1e-8)`, as `dist_kd.py`. Both terms are
    0 when s = t (up to that eps). CE is the plain hard-label CE.

    Options: `temperature` (τ, the official `tau`), `beta` (inter weight), `gamma` (intra
    weight), `ce_weight`. Defaults (CIFAR-100, the DIST_KD CIFAR setting): temperature = 4,
    beta = gamma = 2, ce_weight = 1. ImageNet: temperature = 1, beta = gamma = 2. The official
    code's `DIST(beta=1, gamma=1, tau)` is scaled by `kd_loss_weight: 2` in both its CIFAR
    (`dist_cifar.yaml`) and ImageNet (`resnet_dist.yaml`) configs, so the effective weights are 2
    in both (METHODS.md's "ImageNet β=γ=1" is the loss module's own value, before that factor).

    Needs B > 1: with one sample the intra-class correlation is undefined (a UserError naming
    `trainer.batch_size`).

    Terms: `loss`; `ce` (before ce_weight); `inter`, `intra` (τ²-scaled, before beta/gamma — the
    official `inter_loss`/`intra_loss`). The teacher logits are detached.
    """

    batch_coupling = "its intra-class term correlates each class across the whole batch"
    needs_teacher = True
    uses_labels = True

    def __init__(self, temperature: float = 4.0, beta: float = 2.0, gamma: float = 2.0,
                 ce_weight: float = 1.0):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"DIST temperature must be > 0, got {temperature}",
                            key="loss.temperature",
                            fix="use e.g. 4 (CIFAR) or 1 (ImageNet)")
        for name, v in (("beta", beta), ("gamma", gamma), ("ce_weight", ce_weight)):
            if float(v) < 0:
                raise UserError(f"DIST {name} must be >= 0, got {v}", key=f"loss.{name}",
                                fix="use e.g. beta=gamma=2, ce_weight=1 (CIFAR)")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        check_labels(student_logits, targets)
        if student_logits.shape[0] < 2:
            raise UserError(f"DIST needs at least 2 samples per batch (its intra-class relation "
                            f"correlates each class across the batch), got a batch of "
                            f"{student_logits.shape[0]}", key="trainer.batch_size",
                            fix="use a batch size of at least 2 (e.g. 64)")
        T2 = self.temperature ** 2
        ce = F.cross_entropy(as_float(student_logits), targets)
        inter, intra = dist_terms(student_logits, teacher_logits, self.temperature)
        inter, intra = T2 * inter, T2 * intra
        loss = self.ce_weight * ce + self.beta * inter + self.gamma * intra
        return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}, "
                f"ce_weight={self.ce_weight}")
