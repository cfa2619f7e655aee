"""Relational knowledge distillation (Park et al., CVPR 2019), as RepDistiller's
`distiller_zoo/RKD.py` computes it: distance-wise and angle-wise terms on the penultimate
features (RepDistiller `feat[-1]`: the classifier's input)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.losses.base import StepContext
from distill_cli.losses.ce import _as_float
from distill_cli.losses.features import FeatureObjective, pooled
from distill_cli.losses.fitnet import fp32


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`[B, B]` Euclidean distances from `|a|² + |b|² − 2ab` clamped at `eps` before the sqrt
    (RepDistiller `pdist`), with an exact 0 diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by the mean of the non-zero ones (the scale normaliser μ)."""
    d = pairwise_distances(e)
    # = d[d > 0].mean() without a host sync (off-diagonal entries are >= sqrt(1e-12) > 0); the
    # clamps only keep a batch of one (no pair) finite
    mu = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mu.clamp(min=1e-12)


def triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """`cos ∠(e_j − e_i, e_k − e_i)` for all (i, j, k), flattened to [B³] (difference vectors
    L2-normalised with eps 1e-12, so the degenerate j = i or k = i entries are 0)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)   # [i, j] = e_j − e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKD(FeatureObjective):
    """RKD: `ce_weight·CE + dist_weight·L_dist + angle_weight·L_angle` on the penultimate
    features: the classifier's input `[B, feature_dim]` of each model (`reads = "penultimate"`,
    RepDistiller's `feat[-1]`; on WRN / MobileNetV2 / ShuffleNetV2 that is the pool of the final
    bn-relu / 1x1 conv, not of the last stage). A direct call with maps or tokens `pooled`s them.

    L_dist  = smooth_l1(ψ_D(s), ψ_D(t)), ψ_D = pairwise Euclidean distances / their non-zero mean
    L_angle = smooth_l1(ψ_A(s), ψ_A(t)), ψ_A = cosines of all triplet angles (B³ values)
    smooth_l1 is torch's (β = 1, mean over all B² / B³ entries, diagonal/degenerate zeros
    included, as RepDistiller). The teacher side is computed without gradient. No head: student
    and teacher widths may differ. Needs B >= 2 (B >= 3 for a non-trivial angle term).
    Weights: RepDistiller `RKDLoss(w_d=25, w_a=50)` with `--distill rkd -r 1 -a 0 -b 1`.

    Invariances: scaling all features by a constant (distance normalisation; angles are scale
    free) and rotating them (orthogonal maps keep distances and angles).
    Terms: `loss`; `ce`; `rkd_dist`, `rkd_angle` (before their weights).
    """

    batch_coupling = "it matches distances and angles between the samples of the batch"
    needs_teacher = True
    reads = "penultimate"

    def __init__(self, dist_weight: float = 25.0, angle_weight: float = 50.0,
                 ce_weight: float = 1.0):
        super().__init__()
        self.dist_weight, self.angle_weight = float(dist_weight), float(angle_weight)
        self.ce_weight = float(ce_weight)

    def forward(self, student_logits, teacher_logits, targets, ctx: StepContext | None = None, *,
                s_feats, t_feats, index=None) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(_as_float(student_logits), targets)
        with fp32(ce):
            s = _as_float(pooled(s_feats[-1]))
            with torch.no_grad():
                t = _as_float(pooled(t_feats[-1]))
                t_dist, t_angle = normalised_distances(t), triplet_cosines(t)
            dist = F.smooth_l1_loss(normalised_distances(s), t_dist)
            angle = F.smooth_l1_loss(triplet_cosines(s), t_angle)
        loss = self.ce_weight * ce + self.dist_weight * dist + self.angle_weight * angle
        return {"loss": loss, "ce": ce.detach(), "rkd_dist": dist.detach(),
                "rkd_angle": angle.detach()}

    def extra_repr(self) -> str:
        return (f"dist_weight={self.dist_weight}, angle_weight={self.angle_weight}, "
                f"ce_weight={self.ce_weight}")
