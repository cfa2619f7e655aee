"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as in megvii-research/mdistiller
(`mdistiller/distillers/DKD.py`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.ce import _as_float, check_logits

_MASK = 1000.0  # mdistiller pushes the target logit down by 1000 (after dividing by T)


def _binary_log_probs(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """`[log p_y, log(1 − p_y)]` ([B, 2]) of `softmax(z)`, without ever taking log(0).

    `log p_y = z_y − lse(z)`, `log(1 − p_y) = lse_{c≠y}(z_c) − lse(z)`: both finite whatever the
    logits (mdistiller sums the probabilities and takes `torch.log`, which gives −inf and then
    NaN once a probability underflows). The clamp at 0 only guards against rounding making a
    log-probability slightly positive.
    """
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    log_py = (z * gt).sum(dim=1, keepdim=True) - lse
    log_rest = z.masked_fill(gt, float("-inf")).logsumexp(dim=1, keepdim=True) - lse
    return torch.cat([log_py, log_rest], dim=1).clamp(max=0.0)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample `(TCKD, NCKD)`, each [B], at temperature T, WITHOUT the T² factor or weights.

    TCKD = KL([p_t,y, 1−p_t,y] ‖ [p_s,y, 1−p_s,y]) with `p = softmax(z/T)`.
    NCKD = KL(softmax(t/T − 1000·g) ‖ softmax(s/T − 1000·g)), g the one-hot label mask (the
    target logit is pushed to −∞ on BOTH sides, i.e. the distributions over the non-target
    classes). Per sample: `KL(p_t^T ‖ p_s^T) = TCKD + (1 − p_t,y)·NCKD`.
    The teacher is detached here: it never receives a gradient.
    """
    zs = _as_float(student_logits) / temperature
    zt = _as_float(teacher_logits).detach() / temperature
    gt = targets.unsqueeze(1) == torch.arange(zs.shape[1], device=zs.device)  # [B, C] bool

    log_bs, log_bt = _binary_log_probs(zs, gt), _binary_log_probs(zt, gt)
    tckd = F.kl_div(log_bs, log_bt, reduction="none", log_target=True).sum(dim=1)

    push = gt.to(zs.dtype) * _MASK
    log_qs = F.log_softmax(zs - push, dim=1)
    log_qt = F.log_softmax(zt - push, dim=1)
    nckd = F.kl_div(log_qs, log_qt, reduction="none", log_target=True).sum(dim=1)
    return tckd, nckd


class DKD(Objective):
    """DKD: `ce_weight·CE(s, y) + w·(alpha·TCKD + beta·NCKD)`, exactly as mdistiller.

    - TCKD = T²·KL over the binary target/non-target distributions `[p_y, 1−p_y]`
      (teacher ‖ student), `p = softmax(z/T)`; batchmean.
    - NCKD = T²·KL(softmax(t/T − 1000·g) ‖ softmax(s/T − 1000·g)); batchmean, g = one-hot label.
    - `w = min(ctx.epoch / warmup, 1)`, epochs counted from 1 (epoch 1 of 20 → 0.05). Without a
      `ctx` (e.g. evaluation, unit use) the loss is fully warmed up, w = 1. `warmup <= 0` → w = 1.
    - CE is the plain hard-label CE (no label smoothing, T = 1).

    Numerics: all log-probabilities come from log_softmax / logsumexp, so the binary
    distributions are never logged at 0 (mdistiller's `torch.log` of summed probabilities
    overflows to −inf/NaN for very confident logits; on ordinary logits the values agree).

    Defaults (mdistiller `CFG.DKD`, CIFAR-100): T=4, alpha=1, beta=8, ce_weight=1, warmup=20.
    beta per CIFAR-100 pair: 8 (res32x4→res8x4, ShuffleNet students, res50→mv2), 2 (res56→res20,
    res110→res32), 6 (wrn40_2→wrn16_2/wrn40_1, vgg13→vgg8/mv2). ImageNet R34→R18: T=1,
    beta=0.5, warmup=1.

    Terms: `loss`; `ce` (before ce_weight); `tckd`, `nckd` (T²-scaled, before alpha/beta/w);
    `warmup_weight` (w). The teacher logits are detached.
    """

    accepts_soft_targets = False  # indexes by the hard label

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                 ce_weight: float = 1.0, warmup: float = 20):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"DKD temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4 (CIFAR) or 1 (ImageNet)")
        if float(warmup) < 0:
            raise UserError(f"DKD warmup must be >= 0 epochs, got {warmup}", key="loss.warmup",
                            fix="use e.g. 20 (CIFAR), 1 (ImageNet) or 0 for no warm-up")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.ce_weight = float(ce_weight)
        self.warmup = warmup

    def warmup_weight(self, ctx: StepContext | None) -> float:
        if ctx is None or self.warmup <= 0:
            return 1.0
        return min(ctx.epoch / self.warmup, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        check_logits(student_logits, teacher_logits, targets, needs_teacher=True)
        T2 = self.temperature ** 2
        ce = F.cross_entropy(_as_float(student_logits), targets)
        tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, self.temperature)
        tckd, nckd = tckd.mean() * T2, nckd.mean() * T2
        w = self.warmup_weight(ctx)
        loss = self.ce_weight * ce + w * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(),
                "warmup_weight": torch.full((), w, dtype=ce.dtype, device=ce.device)}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
                f"ce_weight={self.ce_weight}, warmup={self.warmup}")
