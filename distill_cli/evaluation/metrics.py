"""Evaluation accumulators that stay on the device: `update` never synchronises with the host
(no `.item()`, no data-dependent Python branches); `compute` copies the totals back once."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ClassificationMeter:
    """Accumulates classification metrics over batches of logits.

    `compute()` returns floats:
        acc1, acc5   top-1 / top-k accuracy in percent (0-100), k = min(5, num_classes);
        nll          mean cross-entropy of the logits (nats);
        ece          expected calibration error, fraction in [0, 1]: `ece_bins` equal-width
                     confidence bins (lo, hi] of the max softmax probability,
                     `Σ_b |B_b|/N · |acc_b − conf_b|` (Guo et al. 2017);
        agreement    percent of samples whose top-1 class equals the teacher's top-1 — only
                     present when `update` was given `teacher_logits` (over those samples);
        n            number of samples (int).
    Top-1 is `argmax` (first index on ties); a top-1 hit always counts as a top-k hit.
    With n = 0 the metrics are NaN.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ece_bins: int = 15):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be >= 1, got {ece_bins}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.ece_bins = int(ece_bins)
        self.topk = min(5, self.num_classes)
        self.reset()

    def reset(self) -> None:
        z = lambda *shape, dt=torch.float64: torch.zeros(*shape, dtype=dt, device=self.device)  # noqa: E731
        # counts as int64, sums as float64 (exact / stable whatever the number of batches)
        self._n = z((), dt=torch.int64)
        self._correct1 = z((), dt=torch.int64)
        self._correctk = z((), dt=torch.int64)
        self._nll_sum = z(())
        self._n_teacher = z((), dt=torch.int64)
        self._agree = z((), dt=torch.int64)
        self._bin_count = z(self.ece_bins, dt=torch.int64)
        self._bin_conf = z(self.ece_bins)
        self._bin_correct = z(self.ece_bins)
        self._bin_ids = torch.arange(self.ece_bins, device=self.device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor,
               teacher_logits: torch.Tensor | None = None) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [B, {self.num_classes}], got {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")
        x = logits.detach().to(self.device, non_blocking=True)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        y = targets.to(self.device, non_blocking=True).long()

        log_p = F.log_softmax(x, dim=1)
        self._nll_sum += F.nll_loss(log_p, y, reduction="none").double().sum()
        pred = x.argmax(dim=1)
        correct = pred == y
        topk = x.topk(self.topk, dim=1).indices
        correctk = correct | (topk == y.unsqueeze(1)).any(dim=1)
        self._n += y.numel()
        self._correct1 += correct.sum()
        self._correctk += correctk.sum()

        conf = log_p.gather(1, pred.unsqueeze(1)).squeeze(1).exp().double()
        # bin b holds confidences in (b/M, (b+1)/M]; conf >= 1/C > 0 so no sample is dropped
        idx = (conf * self.ece_bins).ceil().long().clamp_(1, self.ece_bins) - 1
        member = idx.unsqueeze(1) == self._bin_ids  # [B, M] one-hot, deterministic sums
        self._bin_count += member.sum(dim=0)
        self._bin_conf += (member * conf.unsqueeze(1)).sum(dim=0)
        self._bin_correct += (member & correct.unsqueeze(1)).sum(dim=0).double()

        if teacher_logits is not None:
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must match "
                                 f"logits {tuple(logits.shape)}")
            t_pred = teacher_logits.detach().to(self.device, non_blocking=True).argmax(dim=1)
            self._n_teacher += y.numel()
            self._agree += (t_pred == pred).sum()

    def compute(self) -> dict[str, float | int]:
        ece_num = (self._bin_correct - self._bin_conf).abs().sum()
        packed = torch.stack([
            self._n.double(), self._correct1.double(), self._correctk.double(), self._nll_sum,
            ece_num, self._n_teacher.double(), self._agree.double(),
        ]).tolist()  # the one host sync
        n, c1, ck, nll, ece, nt, agree = packed
        nan = math.nan
        out: dict[str, float | int] = {
            "acc1": 100.0 * c1 / n if n else nan,
            "acc5": 100.0 * ck / n if n else nan,
            "nll": nll / n if n else nan,
            "ece": ece / n if n else nan,
        }
        if nt:
            out["agreement"] = 100.0 * agree / nt
        out["n"] = int(n)
        return out
