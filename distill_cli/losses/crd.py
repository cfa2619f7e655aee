"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller's
`crd/criterion.py` (CRDLoss, ContrastLoss, Embed) and `crd/memory.py` (ContrastMemory) compute it,
with RepDistiller's CIFAR negatives (`CIFAR100InstanceSample`, mode "exact")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.ce import _as_float
from distill_cli.losses.features import FeatureObjective, pooled
from distill_cli.losses.fitnet import channels, fp32
from distill_cli.losses.kd import kd_kl

EPS = 1e-7  # RepDistiller ContrastLoss eps
NEGATIVES = ("other_class", "any")


def nce_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """RepDistiller `ContrastLoss` (paper eq. 18) on `p = exp(v·m/τ)/Z`, `[B, 1 + K]`, column 0
    the positive: with noise `P_n = 1/N` and `m = K`,
    `−(Σ_i log(p_i0 / (p_i0 + K·P_n + eps)) + Σ_ij log(K·P_n / (p_ij + K·P_n + eps))) / B`."""
    k_pn = (p.shape[1] - 1) / float(n_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + k_pn + EPS))
    log_d0 = torch.log(k_pn / (p[:, 1:] + k_pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


class CRD(FeatureObjective):
    """CRD: `ce_weight·CE(s, y) + kd_weight·T²·KL(p_t^T ‖ p_s^T) + crd_weight·(L_s + L_t)`.

    On the penultimate features `f`: each model's classifier input `[B, feature_dim]`
    (`reads = "penultimate"`, RepDistiller's `feat[-1]`; a direct call with maps `pooled`s
    them). Linear embeds `v_s = norm(W_s f_s)`,
    `v_t = norm(W_t f_t)` into `feat_dim` (L2-normalised; trainable heads, saved under
    `objective`, dropped from the exported student). Two memory banks over the WHOLE training
    split (buffers `[N_train, feat_dim]`): `memory_s` holds student embeddings, `memory_t` teacher
    ones, initialised uniform in ±1/sqrt(feat_dim/3) (ContrastMemory). For each anchor i the
    columns are its own index (the positive, mode "exact") then K negatives:
        L_s = nce_loss(exp(v_s,i · memory_t[idx] / τ) / Z_s)   (student anchor, teacher bank)
        L_t = nce_loss(exp(v_t,i · memory_s[idx] / τ) / Z_t)   (teacher anchor, student bank)
    Z (buffer `z`, [Z_s, Z_t]) is set ONCE, on the first training forward, to
    `mean(exp(·/τ)) · N_train` over that batch's [B, 1+K] scores, and then held constant
    (ContrastMemory's `params[2:4]`; saved in checkpoints). After each optimizer step
    (`after_step`) the banks' rows at the batch's indices become
    `norm(nce_m · row + (1 − nce_m) · v)` with the step's detached embeddings (ContrastMemory
    updates them in its forward, after scoring: same order).

    Negatives (`negatives`): "other_class" (default) draws K distinct training samples of OTHER
    classes than the anchor's label (RepDistiller's CIFAR sampler `cls_negative`; labels read from
    the training split by index, so mixup batches work too); "any" draws K distinct samples other
    than the anchor itself (ContrastMemory's own uniform sampler, but without replacement).
    K = min(nce_k, cap), cap = N_train − (largest class size) for other_class, N_train − 1 for
    any: small data sets (digits: 1293 training images) get as many negatives as exist, always
    without replacement (RepDistiller switches to sampling WITH replacement instead). Sampling is
    `topk` of `torch.rand(B, N_train)` over the allowed positions — uniform without replacement,
    on the global torch RNG (checkpointed by the engine), so a resumed run draws the same
    negatives. Scores come from one `[B, feat_dim] @ [feat_dim, N]` product then a gather (cheaper
    than gathering `[B, 1+K, feat_dim]` rows when K is a sizable fraction of N); cost O(B·N).

    Defaults: RepDistiller `train_student.py` (feat_dim 128, nce_k 16384, nce_t 0.07,
    nce_m 0.5) and its CIFAR script `--distill crd -r 1 -a 0 -b 0.8`: CE 1, KD 0, CRD 0.8
    (`kd_weight=1` gives the paper's "CRD+KD"; KD temperature 4 as RepDistiller's `kd_T`).
    Terms: `loss`; `ce`; `crd` (L_s + L_t before crd_weight); `crd_student` (L_s);
    `crd_teacher` (L_t); `kd` (T²·KL, only when kd_weight > 0).
    """

    batch_coupling = "its memory banks and negatives are updated from the whole batch"
    needs_teacher = True
    reads = "penultimate"

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5, negatives: str = "other_class", crd_weight: float = 0.8,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0):
        super().__init__()
        checks = [(int(feat_dim) >= 1, "feat_dim", "use e.g. 128"),
                  (int(nce_k) >= 1, "nce_k", "use e.g. 16384 (RepDistiller) or 4096"),
                  (float(nce_t) > 0, "nce_t", "use e.g. 0.07"),
                  (0.0 <= float(nce_m) < 1.0, "nce_m", "use a momentum in [0, 1), e.g. 0.5"),
                  (negatives in NEGATIVES, "negatives", f"use one of: {', '.join(NEGATIVES)}"),
                  (float(temperature) > 0, "temperature", "use e.g. 4")]
        for ok, key, fix in checks:
            if not ok:
                raise UserError(f"CRD {key}={locals()[key]!r} is not valid", f"loss.{key}", fix)
        self.feat_dim, self.nce_k, self.nce_t = int(feat_dim), int(nce_k), float(nce_t)
        self.nce_m, self.negatives = float(nce_m), negatives
        self.crd_weight, self.ce_weight = float(crd_weight), float(ce_weight)
        self.kd_weight, self.temperature = float(kd_weight), float(temperature)
        self.k = 0          # negatives per anchor, set by `setup`
        self.n_data = 0
        self.embed_s = self.embed_t = None
        self._train_split = None
        self._pending = None   # (index, v_s, v_t) of the last training forward, for after_step

    # ------------------------------------------------------------------ heads and banks
    def bind(self, student, teacher, data) -> None:
        self._train_split = (len(data.train), data.train.targets)
        super().bind(student, teacher, data)

    def build_heads(self, s_shapes, t_shapes, num_classes, student=None, teacher=None) -> None:
        n_data, labels = self._train_split
        self.setup(channels(s_shapes[-1]), channels(t_shapes[-1]), n_data, labels)

    def setup(self, s_dim: int, t_dim: int, n_data: int, labels: torch.Tensor | None = None
              ) -> None:
        """Create the embeds and the banks for a training split of `n_data` samples (`labels`
        [N] are needed for negatives="other_class")."""
        if self.negatives == "other_class":
            if labels is None:
                raise ValueError("negatives='other_class' needs the training labels")
            cap = n_data - int(torch.bincount(labels.cpu()).max())
        else:
            cap = n_data - 1
        if cap < 1:
            raise UserError(f"CRD has no negatives to sample: {n_data} training samples"
                            + (" all of one class" if self.negatives == "other_class" else ""),
                            "loss.negatives", "Train on more data (dataset.limit_train)")
        self.n_data, self.k = int(n_data), min(self.nce_k, cap)
        self.embed_s = nn.Linear(int(s_dim), self.feat_dim)
        self.embed_t = nn.Linear(int(t_dim), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n_data, self.feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("labels", None if labels is None else labels.to(torch.int64),
                             persistent=False)

    def contrast_indices(self, index: torch.Tensor) -> torch.Tensor:
        """`[B, 1 + K]`: each anchor's own index, then K distinct allowed negatives."""
        noise = torch.rand(len(index), self.n_data, device=self.memory_s.device)
        if self.negatives == "other_class":
            banned = self.labels[None, :] == self.labels[index][:, None]
            noise = noise.masked_fill(banned, 2.0)
        else:
            noise = noise.scatter(1, index[:, None], 2.0)
        negatives = noise.topk(self.k, dim=1, largest=False).indices
        return torch.cat([index[:, None], negatives], dim=1)

    # ------------------------------------------------------------------ loss
    def forward(self, student_logits, teacher_logits, targets, ctx: StepContext | None = None, *,
                s_feats, t_feats, index) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(_as_float(student_logits), targets)
        with fp32(ce):
            v_s = F.normalize(self.embed_s(_as_float(pooled(s_feats[-1]))), dim=1)
            v_t = F.normalize(self.embed_t(_as_float(pooled(t_feats[-1]).detach())), dim=1)
            idx = self.contrast_indices(index)
            out_s = torch.exp((v_s @ self.memory_t.t()).gather(1, idx) / self.nce_t)
            out_t = torch.exp((v_t @ self.memory_s.t()).gather(1, idx) / self.nce_t)
            with torch.no_grad():   # Z: set once from the first batch, then constant
                first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            crd_s = nce_loss(out_s / self.z[0], self.n_data)
            crd_t = nce_loss(out_t / self.z[1], self.n_data)
        crd = crd_s + crd_t
        loss = self.ce_weight * ce + self.crd_weight * crd
        terms = {"ce": ce.detach(), "crd": crd.detach(), "crd_student": crd_s.detach(),
                 "crd_teacher": crd_t.detach()}
        if self.kd_weight:
            kd = kd_kl(student_logits, teacher_logits, self.temperature).mean() * self.temperature ** 2
            loss = loss + self.kd_weight * kd
            terms["kd"] = kd.detach()
        self._pending = (index, v_s.detach(), v_t.detach())
        return {"loss": loss, **terms}

    def after_step(self, terms, ctx: StepContext) -> None:
        """Momentum update of both banks at the last training batch's indices."""
        if self._pending is None:
            return
        index, v_s, v_t = self._pending
        self._pending = None
        with torch.no_grad():
            for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                rows = bank.index_select(0, index) * self.nce_m + v * (1 - self.nce_m)
                bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, nce_k={self.nce_k} (K={self.k}), nce_t={self.nce_t}, "
                f"nce_m={self.nce_m}, negatives={self.negatives}, crd_weight={self.crd_weight}, "
                f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}")
