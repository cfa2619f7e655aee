"""DisWOT: training-free teacher-student similarity scores (Dong, Li & Wei, CVPR 2023,
"DisWOT: Student Architecture Search for Distillation WithOut Training"; METHODS.md "DisWOT").

Both networks are scored at RANDOM INIT on ONE batch `(x, y)`:

* Gaussian init (`gaussian_init_`): conv/linear weights N(0, 1) and their biases 0, norm-layer
  scale 1 / shift 0 — applied to a float64 deep copy, never to the caller's model.
* semantic distance D_sem: CE-backprop each network (mean CE over the batch) and take the final
  FC weight gradient `G` `[K, C]`. Per class k the `C×C` outer product `g_k g_kᵀ`, each row
  L2-normalised (`F.normalize(·, dim=-1)`, eps 1e-12), and
  `D_sem = mean over (k, i, j) of (M_t[k,i,j] − M_s[k,i,j])²`  (K·C·C elements).
  Needs equal penultimate widths C (`semantic_width_ok`).
* relation distance D_rel: pre-pool features `f` — the map that is globally pooled into the
  classifier's input (`models.taps.prepool_path`: the last zoo stage, or WRN's final bn-relu,
  MobileNetV2's / ShuffleNetV2's 1x1 conv block, which their RepDistiller stages stop before) —
  flattened per sample `[B, D]`, Gram matrix `f fᵀ` `[B, B]` row-L2-normalised,
  `D_rel = ‖A_t − A_s‖² / B²`.
* `score = −(D_sem + D_rel)`, each term switchable; higher = more similar = better student.

What the official code (lilujunai/DisWOT-CVPR2023, searcher/rand_search_nb201.py and
evo_search_nb201.py) does, and where we differ:

* It reshapes `G` to `[K, C, 1, 1]` and applies its ICKD loss, i.e. exactly the per-class
  row-normalised outer products above — but it divides the summed squares by `C·K`, not by
  `K·C·C`. METHODS.md says "mean squared difference", so we take the mean; within one search C is
  fixed (it must equal the teacher's), so the ranking by D_sem alone is the same, only its weight
  against D_rel is C times smaller than the official sum.
* Its relation term is SP (Tung & Mori) on the pre-pool features: the same formula as here,
  on the same map: `criterion_sp(tfeature[-2], sfeature[-2])`, where `feature[-2]` of its
  ResNet-56 teacher is layer3's output and of its NB201 students `lastact`'s output — in both
  the map that enters global average pooling. (RepDistiller's own SP also reads `feat[-2]`, which
  for WRN / MobileNetV2 / ShuffleNetV2 is the raw last stage before the bn-relu / 1x1 conv; DisWOT
  never scores those families, so we follow its definition, the pooled map.)
  (In the released search scripts that line is commented out and only the semantic term
  ranks; evo_search_nb201.py uses `fc.weight.grad`, rand_search_nb201.py `fc.weight` itself —
  we follow METHODS.md and the paper: both terms, the gradient.)
* The TEACHER is random too: the paper's abstract ("similarity ... between random-initialized
  teacher-student networks") and the code (`network_weight_gaussian_init(tnet)` on a fresh
  resnet56) never load trained teacher weights for the score. That is our default;
  `reinit_teacher=False` scores against the given (trained) teacher weights instead, an option
  of ours for comparison (benchmarks/diswot_rank.py reports both).
* With different widths the official ICKD call would silently `view` one gradient into the
  other's shape; we never compare mismatched widths (`semantic_width_ok`; the search drops D_sem
  for every candidate, or errors, see distill_cli/search/student_search.py).
* Randomly initialised networks run with BatchNorm in train mode (batch statistics: running
  statistics mean nothing at init), as in the official code; dropout is switched off so the score
  is deterministic. A trained teacher (`reinit_teacher=False`) runs in eval mode, as in KD.
* We compute in float64: N(0, 1) weights grow activations by ~sqrt(fan_in) per layer in models
  without normalisation, which can overflow float32 logits.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.seeding import derive_seed
from distill_cli.models.taps import FeatureTaps, prepool_path

EPS = 1e-12  # F.normalize's eps: a zero row stays zero

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.modules.instancenorm._InstanceNorm)


# ------------------------------------------------------------------------------ initialisation
def gaussian_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """In place: conv/linear weights ~ N(0, 1) with zero biases, norm layers scale 1 / shift 0
    (running statistics reset). The official `network_weight_gaussian_init`, extended from
    Conv2d/BatchNorm2d to every conv dimension and norm layer of the zoo."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator,
                                           dtype=torch.float64).to(m.weight))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, _NORMS):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    m.reset_running_stats()
    return model


def scoring_copy(model: nn.Module, seed: int | None) -> nn.Module:
    """A float64 deep copy ready for `probe`: Gaussian re-initialised from `seed` (BatchNorm in
    train mode), or with `seed=None` the given weights as they are (eval mode). Only the final FC
    weight requires a gradient. The caller's model is never touched."""
    clone = copy.deepcopy(model).double()
    clone.requires_grad_(False)
    if seed is not None:
        gaussian_init_(clone, torch.Generator().manual_seed(int(seed)))
        clone.train()
        for m in clone.modules():   # deterministic: no dropout masks
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
    else:
        clone.eval()
    head(clone).weight.requires_grad_(True)
    return clone


def head(model: nn.Module) -> nn.Linear:
    """The zoo model's final linear layer (`model.classifier`)."""
    layer = model.get_submodule(model.classifier)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__}.{model.classifier} is a "
                        f"{type(layer).__name__}, not nn.Linear: DisWOT needs the FC gradient")
    return layer


def penultimate_width(model: nn.Module) -> int:
    """C: the input width of the final FC layer."""
    return int(head(model).in_features)


def semantic_width_ok(teacher: nn.Module, student: nn.Module) -> bool:
    return penultimate_width(teacher) == penultimate_width(student)


# ------------------------------------------------------------------------------ the two inputs
def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, f) of a `scoring_copy`: the mean-CE gradient of the final FC weight `[K, C]` (by
    autograd: it depends on the classifier's input, whatever the stages are) and the pre-pool
    map (`prepool_path`) on batch `(x, y)`."""
    path = prepool_path(model)
    weight = head(model).weight
    x = x.to(device=weight.device, dtype=weight.dtype)
    with FeatureTaps(model, [path]) as taps:
        logits = model(x)
        feat = taps[path]
    loss = F.cross_entropy(logits, y.to(weight.device))
    (grad,) = torch.autograd.grad(loss, weight)
    return grad.detach(), feat.detach()


# ------------------------------------------------------------------------------ the distances
def _outer_row_factors(g: torch.Tensor) -> torch.Tensor:
    """Row i of the row-normalised outer product g gᵀ is c_i · g with
    c_i = g_i / max(|g_i|·‖g‖, eps) — so the K×C×C tensor never has to exist."""
    norm = g.norm(dim=-1, keepdim=True)
    return g / (g.abs() * norm).clamp_min(EPS)


def semantic_distance(g_t: torch.Tensor, g_s: torch.Tensor) -> torch.Tensor:
    """D_sem for FC gradients `[K, C]` (teacher, student): the mean over K·C·C elements of the
    squared difference of the per-class row-L2-normalised outer products.

    Computed in closed form, O(K·C) memory: with rows c_i·g (see `_outer_row_factors`),
    ‖M_t − M_s‖²_F per class = ‖g_t‖²Σc_t,i² + ‖g_s‖²Σc_s,i² − 2⟨g_t, g_s⟩Σc_t,i·c_s,i.
    Differentiable in `g_s` (DisWOT† back-propagates through it)."""
    if g_t.shape != g_s.shape or g_t.dim() != 2:
        raise ValueError(f"D_sem needs equal [K, C] gradients, got {tuple(g_t.shape)} (teacher) "
                         f"and {tuple(g_s.shape)} (student)")
    k, c = g_t.shape
    ct, cs = _outer_row_factors(g_t), _outer_row_factors(g_s)
    per_class = (g_t.pow(2).sum(-1) * ct.pow(2).sum(-1) + g_s.pow(2).sum(-1) * cs.pow(2).sum(-1)
                 - 2 * (g_t * g_s).sum(-1) * (ct * cs).sum(-1))
    return per_class.clamp_min(0).sum() / (k * c * c)


def relation_matrix(feat: torch.Tensor) -> torch.Tensor:
    """A = row-L2-normalised Gram matrix of the per-sample flattened features `[B, B]`."""
    flat = feat.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1, eps=EPS)


def relation_distance(f_t: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
    """D_rel = ‖A_t − A_s‖²_F / B² for pre-pool features with the same batch size B (any
    per-sample shapes: each side is flattened on its own)."""
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(f"D_rel needs the same batch, got {f_t.shape[0]} and {f_s.shape[0]}")
    b = f_t.shape[0]
    return (relation_matrix(f_t) - relation_matrix(f_s)).pow(2).sum() / (b * b)


# ------------------------------------------------------------------------------ the score
@dataclass
class Probe:
    """What one network contributes to a score: FC gradient and pre-pool features."""
    grad: torch.Tensor
    feat: torch.Tensor


@dataclass
class DisWOTScore:
    d_sem: float | None   # None: term switched off
    d_rel: float | None
    score: float          # −(D_sem + D_rel) over the terms that are on


def init_seed(seed: int, role: str) -> int:
    """The Gaussian-init seed of the teacher / of every candidate student for a search seed:
    every candidate gets the same stream, so the score never depends on candidate order."""
    return derive_seed("diswot-init", role, int(seed))


def probe_network(model: nn.Module, x, y, *, seed: int | None) -> Probe:
    """`probe` of a fresh `scoring_copy` (Gaussian init from `seed`, or the given weights with
    `seed=None`)."""
    grad, feat = probe(scoring_copy(model, seed), x, y)
    return Probe(grad, feat)


def combine(teacher: Probe, student: Probe, *, semantic: bool = True,
            relation: bool = True) -> DisWOTScore:
    if not (semantic or relation):
        raise ValueError("DisWOT needs at least one of the semantic and relation terms")
    d_sem = float(semantic_distance(teacher.grad, student.grad)) if semantic else None
    d_rel = float(relation_distance(teacher.feat, student.feat)) if relation else None
    return DisWOTScore(d_sem, d_rel, -((d_sem or 0.0) + (d_rel or 0.0)))


def diswot_score(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 seed: int = 0, semantic: bool = True, relation: bool = True,
                 reinit_teacher: bool = True) -> DisWOTScore:
    """The DisWOT score of `student` for `teacher` on one batch (neither model is modified).
    With `semantic`, both penultimate widths must be equal (ValueError otherwise)."""
    if semantic and not semantic_width_ok(teacher, student):
        raise ValueError(f"D_sem needs equal penultimate widths, got teacher "
                         f"{penultimate_width(teacher)} and student {penultimate_width(student)}")
    t = probe_network(teacher, x, y, seed=init_seed(seed, "teacher") if reinit_teacher else None)
    s = probe_network(student, x, y, seed=init_seed(seed, "student"))
    return combine(t, s, semantic=semantic, relation=relation)


# ------------------------------------------------------------------------------ rank correlation
def average_ranks(values) -> np.ndarray:
    """1-based ranks, float64; tied values share the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks (float64);
    NaN when fewer than 2 values or either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
