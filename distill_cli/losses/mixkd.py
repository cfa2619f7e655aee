"""MIX-KD — mixup in knowledge distillation with std-normalised logits, as METHODS.md "MIX-KD"
[code: the authors' `MIXSTDLoss` and `PMU` (partial mixup)]."""
from __future__ import annotations

import torch

from distill_cli.data.mixing import MixSpec
from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_pair, soft_cross_entropy
from distill_cli.losses.kd import kd_kl

STD_EPS = 1e-7  # added to σ so a constant logit row cannot divide by 0 (the official adds none)


def std_scaled(logits: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """`z / (σ(z) + eps)` with σ the per-sample standard deviation over classes (keepdim,
    `torch.std`'s default unbiased estimate, as the official code). σ is NOT detached
    (the official code back-propagates through it)."""
    return logits / (logits.std(dim=1, keepdim=True) + eps)


def soft_targets(targets: torch.Tensor, num_classes: int, batch: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """`[B, C]` target distributions: hard int labels `[B]` → one-hot; float `[B, C]` (mixed
    one-hots from (partial) mixup / CutMix, or any label distribution) → used as given."""
    if targets is None:
        raise ValueError("MixKD needs targets: [B] class indices or [B, C] label distributions")
    if targets.dim() == 1 and not targets.is_floating_point() and targets.shape[0] == batch:
        return (targets.unsqueeze(1) == torch.arange(num_classes, device=targets.device)).to(dtype)
    if targets.dim() == 2 and targets.is_floating_point() and targets.shape == (batch, num_classes):
        return as_float(targets).detach().to(dtype)
    raise ValueError(f"MixKD targets must be [B] = [{batch}] integer class indices or "
                     f"[B, C] = [{batch}, {num_classes}] float label distributions, got shape "
                     f"{tuple(targets.shape)} dtype {targets.dtype}")


class MixKD(Objective):
    """MIX-KD: `soft_weight·softCE(s/σ_s, y) + kd_weight·KL(softmax(t/σ_t) ‖ softmax(s/σ_s))`.

    - σ_s, σ_t: each sample's own standard deviation of its logits over the classes (keepdim,
      unbiased like `torch.std`, + 1e-7), used INSTEAD of a temperature. Scaling both logit
      tensors by any positive constant leaves the loss unchanged (up to that eps).
    - softCE(z, y) = −mean_i Σ_c y_ic·log_softmax(z)_ic; KL batchmean; no T², no other CE.
    - Defaults (official): soft_weight = 0.1 (its `gamma`), kd_weight = 0.9 (its `alpha`).

    Targets: hard int64 labels `[B]` (→ one-hot) OR float label distributions `[B, C]` — the
    mixed one-hots of mixup. The two give the same loss for one-hot targets.

    Partial mixup (the "MIX" of MIX-KD) is a BATCH augmentation (data/mixing.py), not part of
    this objective: a fraction of the batch is mixed with `a ~ Beta(1, 1)` between two shuffled
    copies of the batch, the rest keeps a = 1 (unmixed); the teacher sees the same mixed
    images, and the targets become `a·onehot(y1) + (1 − a)·onehot(y2)`. The engine provides it
    and passes the mixed targets here. `loss=mixkd` brings the authors' setting by default
    (conf/loss/mixkd.yaml's defaults list pulls conf/augment/mixkd.yaml into `augment.mix`:
    keep_fraction 0.9 drawn WITH replacement, ~59% of rows unmixed) and receives the run's
    `augment.mix` as `mix` to check it: a run whose `augment.mix` has no partial mixup (the user
    turned it off) is refused with a UserError, since it would measure std-normalised KD, not
    MIX-KD. Direct calls (`mix=None`) compute the loss on whatever targets they are given.

    Evaluation: the authors validate on std-scaled outputs (`output / std(output)` in their
    `validate`, loops_mixstd.py), which leaves accuracy unchanged but not NLL or calibration.
    `eval_logits(logits)` is that transform; an evaluator that honours it reports NLL/ECE of the
    std-scaled outputs (the authors' view), otherwise the reported ECE is of the raw logits.

    Terms: `loss`; `soft_ce` (before soft_weight); `kd` (before kd_weight). The teacher logits
    (and σ_t) are detached; σ_s is not.
    """

    needs_teacher = True
    uses_labels = True

    # what the reported NLL/ECE are computed on when the evaluator applies `eval_logits`
    eval_view = "std_scaled"

    def __init__(self, soft_weight: float = 0.1, kd_weight: float = 0.9, mix=None):
        super().__init__()
        if mix is not None:
            check_partial_mixup(mix)
        for name, v in (("soft_weight", soft_weight), ("kd_weight", kd_weight)):
            if float(v) < 0:
                raise UserError(f"MixKD {name} must be >= 0, got {v}", key=f"loss.{name}",
                                fix="use e.g. soft_weight=0.1, kd_weight=0.9 (official)")
        self.soft_weight = float(soft_weight)
        self.kd_weight = float(kd_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        s = std_scaled(as_float(student_logits))
        t = std_scaled(as_float(teacher_logits).detach())
        y = soft_targets(targets, s.shape[1], s.shape[0], s.dtype)
        soft_ce = soft_cross_entropy(s, y).mean()
        kd = kd_kl(s, t, 1.0).mean()
        loss = self.soft_weight * soft_ce + self.kd_weight * kd
        return {"loss": loss, "soft_ce": soft_ce.detach(), "kd": kd.detach()}

    @staticmethod
    def eval_logits(logits: torch.Tensor) -> torch.Tensor:
        """The outputs the authors evaluate: each row divided by its own std (`std_scaled`)."""
        return std_scaled(as_float(logits))

    def extra_repr(self) -> str:
        return f"soft_weight={self.soft_weight}, kd_weight={self.kd_weight}"


def check_partial_mixup(mix) -> MixSpec:
    """The run's `augment.mix` must mix partially (MIX-KD's PMU); a UserError otherwise."""
    spec = MixSpec.from_config(mix)   # its own values are checked there (keys augment.mix.*)
    if spec.partial is None or not spec.enabled:
        raise UserError("loss=mixkd trains on partial-mixup batches (MIX-KD's PMU), but the "
                        "run's augment.mix has it turned off, so it would measure "
                        "std-normalised KD, not MIX-KD", "augment.mix.partial",
                        "Drop the override: loss=mixkd brings the authors' partial mixup "
                        "(conf/augment/mixkd.yaml); change it with e.g. "
                        "augment.mix.partial.with_replacement=false (exactly 90% unmixed) or "
                        "augment.mix.partial.keep_fraction=0 (every row mixed)")
    return spec
