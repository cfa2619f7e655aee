"""DisWOT† — the DisWOT similarity distances as distillation losses (Dong, Li & Wei, CVPR 2023,
"DisWOT: Student Architecture Search for Distillation WithOut Training", §"DisWOT as
distiller"; METHODS.md "DisWOT": "the same two distances can be added as training losses
(DisWOT†, weights our choice)"). The search-time scores are
distill_cli/evaluation/diswot.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.evaluation.diswot import penultimate_width, relation_distance, semantic_distance
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.ce import _as_float, check_logits
from distill_cli.losses.features import FeatureObjective
from distill_cli.losses.kd import kd_kl


def fc_gradient(logits: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂ mean-CE / ∂W of a final linear layer `logits = h Wᵀ + b` (`h` `[B, C]`: its input), in
    closed form: `G = (softmax(z) − Y)ᵀ h / B` `[K, C]`; Y one-hot (or the given label
    distribution).
    Differentiable in `logits` and `h` (the autograd gradient of CE would need a double
    backward; tests check the two agree)."""
    probs = F.softmax(logits, dim=1)
    y = (targets if targets.dim() == 2
         else F.one_hot(targets, logits.shape[1]).to(probs.dtype))
    return (probs - y).t() @ h / logits.shape[0]


class DisWOTDistill(FeatureObjective):
    """DisWOT†: KD plus DisWOT's semantic and relation distances between student and teacher.

        loss = ce_weight·CE(s, y) + kd_weight·T²·KL(p_t^T ‖ p_s^T)
               + semantic_weight·D_sem(G_t, G_s) + relation_weight·D_rel(f_t, f_s)

    It reads, per model (`reads = "prepool"`, losses/features.py), `[f, h]`: `f` the map that
    is globally pooled (`taps.prepool_path`: the last stage, or WRN's final bn-relu /
    MobileNetV2's and ShuffleNetV2's 1x1 conv block) and `h` the classifier's input
    (`taps.ClassifierInput`, RepDistiller's `feat[-1]`) — the same two tensors the search's
    scores read (distill_cli.evaluation.diswot.probe).

    * KD part exactly as `losses.kd.KD` (batchmean KL from log-probabilities, teacher detached):
      METHODS.md's DisWOT distillation setting T 4, CE 0.1, KD 0.9.
    * D_sem (distill_cli.evaluation.diswot.semantic_distance): per-class row-normalised outer
      products of the FC weight gradients `G = (softmax(z) − onehot(y))ᵀ h / B` (`fc_gradient`,
      the exact mean-CE gradient of the classifier's weight, as the search takes it by
      autograd; with dropout in front of the classifier, `h` is what the classifier received).
      The teacher side is the frozen teacher's gradient on the same batch (no graph); the
      student side back-propagates through its logits and `h`. Needs equal penultimate widths
      (checked in `bind`: set `semantic_weight: 0` otherwise).
    * D_rel (distill_cli.evaluation.diswot.relation_distance): row-normalised B×B Gram matrices of
      `f` flattened per sample, ‖A_t − A_s‖²/B² — the SP loss (Tung & Mori) on the pre-pool
      map, as DisWOT's code reads it (`feature[-2]` of its ResNet teacher and NB201 students is
      the map entering global pooling).
    * Weights (OUR choice, the paper gives none for DisWOT†): relation_weight 3000 is
      RepDistiller's SP weight (`--beta 3000`) for this same formula; semantic_weight 30: for
      unrelated gradients D_sem ≈ 2/C (each normalised row is ±g/‖g‖, C rows per class, a mean
      over C² entries), 0.03 at C = 64, so 30 puts the term near 1 at the start, the scale of
      the KD term. Either 0 switches the term off.

    Called with logits only (the logit-only contract, e.g. config tests), without features,
    only the KD part is computed. Terms: `loss`; `ce`, `kd` (T²·KL), `d_sem`, `d_rel` (before
    their weights).
    """

    batch_coupling = "its relation term compares the samples of the batch with each other"
    needs_teacher = True
    reads = "prepool"

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 semantic_weight: float = 30.0, relation_weight: float = 3000.0):
        super().__init__()
        if not float(temperature) > 0:
            raise UserError(f"DisWOT† temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use e.g. 4")
        for key, value in (("semantic_weight", semantic_weight),
                           ("relation_weight", relation_weight)):
            if not float(value) >= 0:
                raise UserError(f"loss.{key} must be >= 0, got {value}", key=f"loss.{key}",
                                fix="use 0 to switch the term off")
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.semantic_weight = float(semantic_weight)
        self.relation_weight = float(relation_weight)

    def build_heads(self, s_shapes, t_shapes, num_classes, student, teacher) -> None:
        # no trainable heads; only check that D_sem is defined for this pair (h is the FC's
        # input by construction, so its width is the FC's in_features)
        if self.semantic_weight == 0:
            return
        c_s, c_t = penultimate_width(student), penultimate_width(teacher)
        if c_s != c_t:
            raise UserError(
                f"DisWOT†'s semantic term compares the final FC gradients [K x C], but the "
                f"student's penultimate width (its classifier's input) is {c_s} and the "
                f"teacher's {c_t}", key="loss.semantic_weight",
                fix=f"Pass loss.semantic_weight=0 (relation term and KD only), or pick a "
                    f"student whose classifier takes {c_t} features")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None, *, s_feats=None,
                t_feats=None, index=None) -> dict[str, torch.Tensor]:
        check_logits(student_logits, teacher_logits, targets, needs_teacher=True)
        s, t = _as_float(student_logits), _as_float(teacher_logits).detach()
        T = self.temperature
        ce = F.cross_entropy(s, targets)
        kd = kd_kl(s, t, T).mean() * (T * T)
        loss = self.ce_weight * ce + self.kd_weight * kd
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        if s_feats is not None and t_feats is not None:
            if len(s_feats) != 2 or len(t_feats) != 2:
                raise ValueError("DisWOT† reads [pre-pool map, classifier input] of each model, "
                                 f"got {len(s_feats)} and {len(t_feats)} features")
            f_s, h_s = (_as_float(v) for v in s_feats)
            f_t, h_t = (_as_float(v).detach() for v in t_feats)
            # Gram matrices and outer-product norms in float32 even under bf16 autocast
            with torch.autocast(device_type=f_s.device.type, enabled=False):
                loss = loss + self._distances(s, t, targets, (f_s, h_s), (f_t, h_t), terms)
        return {"loss": loss, **terms}

    def _distances(self, s, t, targets, student, teacher, terms: dict) -> torch.Tensor:
        (f_s, h_s), (f_t, h_t) = student, teacher
        loss = s.new_zeros(())
        if self.semantic_weight:
            g_t = fc_gradient(t, h_t, targets)
            g_s = fc_gradient(s, h_s, targets)
            d_sem = semantic_distance(g_t, g_s)
            loss = loss + self.semantic_weight * d_sem
            terms["d_sem"] = d_sem.detach()
        if self.relation_weight:
            d_rel = relation_distance(f_t, f_s)
            loss = loss + self.relation_weight * d_rel
            terms["d_rel"] = d_rel.detach()
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, semantic_weight={self.semantic_weight}, "
                f"relation_weight={self.relation_weight}")

