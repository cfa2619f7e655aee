"""Sample-quality metrics for generative students, on FEATURE tensors `[N, D]` (the diffusion task
computes them with a classifier the teacher store trained on the same data, so the numbers are
reported as `fd_<classifier>`, never "FID": Inception weights are not available offline).

- `frechet_distance`: torchmetrics' `FrechetInceptionDistance` with an identity "feature
  extractor" (`_Features`), i.e. its own float64 statistics and its own
  `||mu1-mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)` (trace of the square root from the eigenvalues of
  S1 S2) — the maintained implementation, fed our features through its documented custom-`feature`
  hook instead of a hand-written matrix square root. Both sets are shifted by the real mean first
  (FD is invariant under a common translation) so the library's `sum(x xᵀ) - N μ μᵀ` covariance
  does not cancel digits on features with a large offset.
- `kernel_distance`: KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial
  kernel k(x, y) = (xᵀy / D + 1)³, averaged over random subsets — torchmetrics' `poly_mmd` per
  subset; the subsets are drawn here with an explicit, seeded generator (the library's class draws
  them from the global RNG, which would make evaluation depend on, and disturb, training's RNG).
- `precision_recall`: improved precision/recall (Kynkäänniemi et al. 2019), k-NN balls in feature
  space, distances in row chunks.
- `class_accuracy`, `class_entropy`, `per_class_frechet`: conditional accuracy, class coverage
  (mode collapse shows as entropy < 1) and per-class FD (issue "distribution matching").

Inputs may live on any device; every statistic is computed in float64 and returned as a Python
float. Contract violations (shapes, too few samples) raise `ValueError`: the task checks the user's
sample counts before sampling, where it knows the config key.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill_cli.errors import UserError

#: bytes of one float64 distance chunk in `precision_recall` (rows x N x 8 bytes)
_CHUNK_BYTES = 1 << 27


def _torchmetrics_image():
    # imported lazily: torchmetrics is the optional `diffusion` extra, and importing it costs
    # seconds that no classification command should pay
    try:
        from torchmetrics.image import fid, kid
    except ImportError:
        raise UserError("task=diffusion scores samples with torchmetrics (Fréchet distance, KID), "
                        "which is not installed", "task",
                        "Install the diffusion extra with `pip install -e .[diffusion]`") from None
    return fid, kid


class _Features(nn.Module):
    """The identity as torchmetrics' "feature extractor": our inputs already ARE the features.
    `num_features` spares the metric its probe call on a dummy image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def _features(x: Tensor, name: str, min_rows: int = 2) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a [N, D] feature tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows; this metric needs at least {min_rows}")
    x = x.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        # a diverged generator gives NaN/inf samples -> features; the metric would be NaN anyway,
        # say so instead of returning a number built from garbage
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _pair(real: Tensor, fake: Tensor, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    real, fake = _features(real, "real", min_rows), _features(fake, "fake", min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs "
                         f"{fake.shape[1]}")
    return real, fake.to(real.device)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to `real` and `fake` ([N, D] each, N >= 2;
    unbiased covariances), float64 throughout. With N < D the covariances are singular; the value
    is still defined but biased upwards — use N well above D for a table."""
    real, fake = _pair(real, fake)
    fid, _ = _torchmetrics_image()
    shift = real.mean(dim=0)
    # sync_on_compute=False: these are this process's tensors; under torchrun the metric would
    # otherwise all-gather its states across ranks that never call it (a hang)
    metric = fid.FrechetInceptionDistance(feature=_Features(real.shape[1]),
                                          sync_on_compute=False).to(real.device)
    metric.update(real - shift, real=True)
    metric.update(fake - shift, real=False)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 10, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std over `subsets`) of the unbiased polynomial-kernel MMD² between random
    subsets of m = min(subset_size, N_real, N_fake) rows of each set (drawn without replacement,
    as in Bińkowski et al.'s reference code, which also caps m at the set sizes), degree 3,
    gamma 1/D, coef 1. Deterministic in `seed`; the global RNG is untouched. Can be slightly
    negative for matching distributions (unbiased). std is the population std, as torchmetrics'."""
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kernel_distance needs subsets >= 1 and subset_size >= 2, got "
                         f"{subsets}, {subset_size}")
    real, fake = _pair(real, fake)
    _, kid = _torchmetrics_image()
    m = min(subset_size, real.shape[0], fake.shape[0])
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    scores = []
    for _ in range(subsets):
        ir = torch.randperm(real.shape[0], generator=gen)[:m].to(real.device)
        jf = torch.randperm(fake.shape[0], generator=gen)[:m].to(real.device)
        scores.append(kid.poly_mmd(real[ir], fake[jf], degree=3, gamma=None, coef=1.0))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _sq_dists(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances [len(a), len(b)], float64, clamped at 0 (the expansion can go
    a hair negative for identical points)."""
    d = (a * a).sum(1, keepdim=True) + b_sq.unsqueeze(0) - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def _chunk_rows(n_cols: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(1, n_cols)))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Squared distance of each row of x to its k-th nearest OTHER row of x (the row itself is
    the smallest entry of its own distance row, hence the (k+1)-th smallest), as Kynkäänniemi et
    al.'s reference code."""
    x_sq = (x * x).sum(1)
    step = _chunk_rows(x.shape[0])
    return torch.cat([_sq_dists(x[i:i + step], x, x_sq).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], step)])


def _inside(query: Tensor, ref: Tensor, radii: Tensor) -> Tensor:
    """Per query row: does it lie in some ball B(ref_j, radius_j) (boundary included)?"""
    ref_sq = (ref * ref).sum(1)
    step = _chunk_rows(ref.shape[0])
    return torch.cat([(_sq_dists(query[i:i + step], ref, ref_sq) <= radii.unsqueeze(0)).any(1)
                      for i in range(0, query.shape[0], step)])


@torch.no_grad()
def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), fractions in [0, 1].

    The real manifold is the union of balls around each real feature with radius = its distance
    to its k-th nearest real neighbour; the fake manifold likewise. precision = share of fake
    samples inside the real manifold (quality), recall = share of real samples inside the fake
    manifold (coverage: a mode-collapsed generator has low recall). Distances are computed in row
    chunks of at most `_CHUNK_BYTES`, never a full N x N matrix. Needs more than k rows per set."""
    if k < 1:
        raise ValueError(f"precision_recall needs k >= 1, got {k}")
    real, fake = _pair(real, fake, min_rows=k + 1)
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def _predicted(logits: Tensor, num_classes: int | None = None) -> Tensor:
    """Class ids from [N, C] logits (argmax, first index on ties) or a [N] integer tensor of ids."""
    if logits.dim() == 1 and not logits.is_floating_point():
        pred = logits.long()
    elif logits.dim() == 2:
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"logits have {logits.shape[1]} columns, expected {num_classes}")
        pred = logits.argmax(1)
    else:
        raise ValueError(f"expected [N, C] logits or [N] class ids, got {tuple(logits.shape)}")
    if pred.numel() == 0:
        raise ValueError("no samples to score")
    if num_classes is not None and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes}), got "
                         f"[{int(pred.min())}, {int(pred.max())}]")
    return pred


@torch.no_grad()
def class_entropy(logits: Tensor, num_classes: int) -> float:
    """Class coverage: the entropy of the histogram of predicted classes (argmax of `logits`
    [N, C], or [N] integer class ids), divided by log(num_classes). 1 = every class equally often,
    0 = a single class (total mode collapse). Needs num_classes >= 2."""
    if num_classes < 2:
        raise ValueError(f"class_entropy needs num_classes >= 2, got {num_classes}")
    pred = _predicted(logits, num_classes)
    p = torch.bincount(pred, minlength=num_classes).double() / pred.numel()
    h = -(p[p > 0] * p[p > 0].log()).sum()  # 0 log 0 = 0
    return float(h / math.log(num_classes))


@torch.no_grad()
def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percent (0-100) of samples whose predicted class (argmax of [N, C] logits) equals the label
    they were generated for ([N] int)."""
    pred = _predicted(logits)
    if labels.shape != pred.shape:
        raise ValueError(f"labels must be [{pred.shape[0]}], got {tuple(labels.shape)}")
    return float((pred == labels.to(pred.device).long()).double().mean() * 100.0)


def per_class_frechet(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor,
                      num_classes: int) -> dict[int, float]:
    """Fréchet distance per class c between the real rows labelled c and the fake rows generated
    for c, for every class with at least 2 rows in both sets (classes with fewer are left out of
    the dict, not guessed). Their mean is the usual "per-class FD" summary."""
    real, fake = _pair(real, fake)
    real_labels, fake_labels = real_labels.to(real.device), fake_labels.to(real.device)
    if real_labels.shape != real.shape[:1] or fake_labels.shape != fake.shape[:1]:
        raise ValueError("real_labels / fake_labels must be [N] matching their feature rows")
    out = {}
    for c in range(num_classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if r.shape[0] >= 2 and f.shape[0] >= 2:
            out[c] = frechet_distance(r, f)
    return out
