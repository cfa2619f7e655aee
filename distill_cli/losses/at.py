"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"),
as RepDistiller's `distiller_zoo/AT.py` computes it (p = 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.ce import _as_float
from distill_cli.losses.features import FeatureObjective
from distill_cli.losses.fitnet import as_map, feature_grid, fp32


def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """`a(F) = F.normalize(mean_c F², dim=1)` over the flattened H·W positions: [B, C, H, W] -> [B, H·W]
    (L2 norm per sample, eps 1e-12, RepDistiller `Attention.at` with p = 2)."""
    return F.normalize(feat.pow(2).mean(dim=1).flatten(1), dim=1)


def at_pair_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """`mean((a(F_s) − a(F_t))²)` over batch AND positions (RepDistiller's `.pow(2).mean()`).

    When the maps differ in size, the larger one's FEATURES (not F²) are adaptive-average-pooled
    to the smaller size before `a` is taken, as RepDistiller does (per dimension here, so
    non-square maps work too). Channel counts may differ: `a` averages over channels."""
    size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
    if tuple(f_s.shape[2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s) - attention_map(f_t)).pow(2).mean()


class AT(FeatureObjective):
    """AT: `ce_weight·CE(s, y) + feat_weight·Σ_pairs mean((a(F_s) − a(F_t))²)`.

    `a(F) = row-L2-normalise(mean_c F²)` (p = 2); the mean runs over the batch and the H·W
    positions (RepDistiller: `(at(f_s) - at(f_t)).pow(2).mean()`, so it includes 1/B and 1/HW);
    summed over all stage pairs (RepDistiller: `feat_s[1:-1]`, every stage between stem and
    pool), weight 1000 (`--distill attention -r 1 -a 0 -b 1000`). The teacher side carries no
    gradient. Size mismatch: see `at_pair_loss`. Tokens `[B, N, D]` are laid out as maps
    `[B, D, h, w]` first. Vector stages `[B, D]` have no spatial layout to transfer attention
    over: they are a user error at bind time (use FitNet, RKD or CRD for MLPs).

    Identities: loss 0 when F_s = F_t; invariant to a positive per-sample scale of F.
    Terms: `loss`; `ce`; `at` (Σ over pairs before feat_weight).
    """

    needs_teacher = True

    def __init__(self, stages="all", feat_weight: float = 1000.0, ce_weight: float = 1.0):
        if isinstance(stages, str) and stages != "all":
            raise UserError(f"AT stages={stages!r} is not an option", "loss.stages",
                            "Use all or a list of student stage indices, e.g. [0, 1]")
        super().__init__(stages)
        self.feat_weight, self.ce_weight = float(feat_weight), float(ce_weight)
        self.grids: list[tuple] = []

    def build_heads(self, s_shapes, t_shapes, num_classes, student=None, teacher=None) -> None:
        """No trainable heads: checks that every paired stage is a map or tokens."""
        for side, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            for shape in shapes:
                if len(shape) == 1:
                    raise UserError(
                        f"AT needs spatial feature maps, but a tapped {side} stage is a vector "
                        f"[B, {int(shape[0])}] (an MLP)", "loss",
                        "Use loss=fitnet, loss=rkd or loss=crd for vector features, or a "
                        "convolutional / token model")
        self.grids = [(feature_grid(s, student, "student", "loss.stages"),
                       feature_grid(t, teacher, "teacher", "loss.stages"))
                      for s, t in zip(s_shapes, t_shapes)]

    def forward(self, student_logits, teacher_logits, targets, ctx: StepContext | None = None, *,
                s_feats, t_feats, index=None) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(_as_float(student_logits), targets)
        grids = self.grids or [(None, None)] * len(s_feats)
        with fp32(ce):
            at = sum(at_pair_loss(_as_float(as_map(f_s, gs)), _as_float(as_map(f_t, gt).detach()))
                     for f_s, f_t, (gs, gt) in zip(s_feats, t_feats, grids))
        loss = self.ce_weight * ce + self.feat_weight * at
        return {"loss": loss, "ce": ce.detach(), "at": at.detach()}

    def extra_repr(self) -> str:
        return f"stages={self.stages}, feat_weight={self.feat_weight}, ce_weight={self.ce_weight}"
