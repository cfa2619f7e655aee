"""OFA-KD — One-for-All distillation between heterogeneous architectures (Hao et al., NeurIPS
2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
Distillation"; official code Hao840/OFAKD `distillers/ofa.py`).

Adaptive target enhancement on any logits `z` (m = one-hot label, p_t = softmax(t/T)):

    L_OFA(z) = −mean_i Σ_c [(p_t,c + m_c)^ε − m_c] · log_softmax(z/T)_c

The target weights are NOT renormalised (their sum is ≠ 1 for ε ≠ 1), ε = 1 is exactly the
soft-label CE with the teacher's probabilities, there is no T², and the loss is not 0 when the
student equals the teacher (it is a cross-entropy, not a divergence).

Total (every stage in `stages` gets a trainable projector to logit space, "head"):

    loss = gt_weight·CE(s, y; label_smoothing) + kd_weight·L_OFA(s)
           + ofa_weight·Σ_stage L_OFA(head_stage(F_stage))

Projectors (built in `bind` from one dry forward, trained jointly, saved under the checkpoint's
`objective`, never part of the exported student). d_s / d_t are the two models' `feature_dim`:
* maps `[B, C, H, W]` (official CNN branch): as many stride-2 depthwise-separable conv blocks
  as it takes to halve H down to the last student stage's resolution (channels double, the last
  block outputs max(d_s, d_t)); a stage already at that resolution (the last one) gets a 1x1
  conv to max(d_s, d_t) instead; then global average pool and Linear to the classes.
* tokens `[B, N, D]` (official ViT/MLP branch; zoo convention: no CLS token, row-major on the
  model's `grid_size`, else a √N x √N grid): patch merging (LayerNorm + Linear of each 2x2
  neighbourhood, halving the grid; odd sides are zero-padded, the official code asserts even
  sides), the first merge projecting to d_s. How many merges (`final_grid`): the official
  rule (default, `final_grid: 7`) merges towards OFA's fixed 7x7 grid,
  n = max(floor(log2(g / 7)), 0) for a grid of side g (the smaller side of a non-square grid):
  14 -> 7, 28 -> 7, 56 -> 7; grids that cannot reach 7x7 by halving keep the official count
  (8 -> 0 merges: 8x8 stays, 16 -> 8x8, 4x4 digits/Fashion-MNIST grids -> 0). `final_grid:
  last` (ours, before) merges down to the last student stage's grid instead. Then
  `head_blocks` pre-norm transformer blocks of width d_s (4 heads, MLP ratio 4; "auto" = the
  official max(stages after this one, 1)), LayerNorm, mean over tokens, Linear. As the
  official code, the token branch is d_s wide (only the CNN branch uses max(d_s, d_t)); the
  final LayerNorm is this project's addition (issue #6), the official code pools the raw stream.
  A stage with no merge and D ≠ d_s gets a Linear D → d_s first (ours).
* vectors `[B, D]` (MLP students; no official counterpart, ours): Linear(D, max(d_s, d_t)),
  ReLU, Linear to the classes. (1-D conv maps `[B, C, L]` are refused by FeatureObjective.)
Initialisation as the official `init_weights`: convs He-normal (fan_out), BN 1/0, Linear
truncated normal std 0.02 with zero bias.

With mixup/CutMix targets (`[B, C]` distributions) the CE takes the distribution and m is the
one-hot of its argmax, as the official code does. Terms: `loss`; `ce`, `kd` (= L_OFA(s)),
`ofa` (Σ over stages) before their weights; `ofa_stage<i>` per student stage i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.losses.ce import _as_float, check_logits
from distill_cli.losses.features import FeatureObjective
from distill_cli.models.taps import FeatureTaps


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, onehot: torch.Tensor,
             eps: float, temperature: float = 1.0) -> torch.Tensor:
    """`L_OFA` above (a scalar): weights `(p_t + m)^ε − m`, not renormalised; teacher
    detached."""
    p_t = F.softmax(_as_float(teacher_logits).detach() / temperature, dim=1)
    weights = (p_t + onehot) ** eps - onehot
    log_p = F.log_softmax(_as_float(logits) / temperature, dim=1)
    return -(weights * log_p).sum(dim=1).mean()


class SepConv(nn.Sequential):
    """Two depthwise-separable 3x3 convs (the first at stride 2), each + BN + ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cin, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PatchMerging(nn.Module):
    """`[B, h*w, D]` -> `[B, ceil(h/2)*ceil(w/2), out]` (row-major tokens on the (h, w) grid):
    concat each 2x2 neighbourhood, LayerNorm, Linear."""

    def __init__(self, grid: tuple[int, int], dim: int, out_dim: int, act: bool):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, D = x.shape
        h, w = self.grid
        x = x.reshape(B, h, w, D)
        if h % 2 or w % 2:   # odd grid: pad a zero row / column (Swin's convention)
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.act(self.reduction(self.norm(x.flatten(1, 2))))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), x + MLP(LN(x)) (no qkv bias, MLP ratio 4)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _halvings(size: int, target: int) -> int:
    """How many stride-2 steps take `size` to `target` (e.g. 14 -> 3 takes 2)."""
    return max(round(math.log2(size / max(target, 1))), 0)


def map_head(shape, last: int, width: int, num_classes: int) -> nn.Module:
    cin, n = int(shape[0]), _halvings(min(shape[1:]), last)
    if n == 0:
        down = [nn.Conv2d(cin, width, 1)]
    else:
        down = [SepConv(cin * 2 ** i, width if i == n - 1 else cin * 2 ** (i + 1))
                for i in range(n)]
    return nn.Sequential(*down, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


OFA_FINAL_GRID = 7   # official `final_patch_grid = 7  # finally there are 49 patches`


def official_merges(side: int, final: int = OFA_FINAL_GRID) -> int:
    """The official count `max(int(log2(side / final)), 0)`, in integers: the largest n >= 0
    with final·2^n <= side (0 when side < 2·final)."""
    n = 0
    while final * 2 ** (n + 1) <= side:
        n += 1
    return n


def token_head(shape, grid: tuple[int, int], n: int, d_s: int, blocks: int,
               num_classes: int) -> nn.Module:
    """`n` patch merges (`official_merges`, or `_halvings` to the last stage's grid), then
    `blocks` transformer blocks, LayerNorm, token mean, Linear."""
    dim = int(shape[1])
    layers: list[nn.Module] = []
    for i in range(n):   # the official activations: GELU after all merges but a last (2nd+) one
        layers.append(PatchMerging(grid, dim if i == 0 else d_s, d_s, act=i == 0 or i < n - 1))
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    if n == 0 and dim != d_s:
        layers.append(nn.Linear(dim, d_s))
    heads = max(h for h in (4, 2, 1) if d_s % h == 0)   # the official 4 heads where they divide
    layers += [Block(d_s, heads) for _ in range(blocks)]
    return nn.Sequential(*layers, nn.LayerNorm(d_s), MeanTokens(), nn.Linear(d_s, num_classes))


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def vector_head(width_in: int, width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width_in, width), nn.ReLU(), nn.Linear(width, num_classes))


def token_grid(n_tokens: int, model) -> tuple[int, int]:
    """(h, w) of `n_tokens` row-major tokens: the model's `grid_size`, or that grid halved
    (rounding up) as often as a hierarchical model merged it; else a √N x √N square."""
    grid = getattr(model, "grid_size", None)
    if grid is not None and len(grid) == 2:
        h, w = int(grid[0]), int(grid[1])
        while h * w > n_tokens and (h > 1 or w > 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == n_tokens:
            return h, w
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise UserError(f"A student stage gives {n_tokens} tokens, which lie on no square grid "
                        "and not on the model's `grid_size`", "loss.stages",
                        "Token stages must be [B, N, D] row-major over the patch grid without a "
                        "CLS token (the zoo's convention)")
    return side, side


def _resolution(shape, model) -> int:
    """Spatial size of a stage output (no batch dim): min(H, W) of a map or of a token grid
    (the model's `grid_size`, else √N x √N), 1 of a vector."""
    if len(shape) == 3:
        return min(int(shape[1]), int(shape[2]))
    return min(token_grid(int(shape[0]), model)) if len(shape) == 2 else 1


class OFA(FeatureObjective):
    """OFA-KD (see the module docstring for the exact loss and projectors)."""

    needs_teacher = True

    def __init__(self, eps: float = 1.0, temperature: float = 1.0, gt_weight: float = 1.0,
                 kd_weight: float = 1.0, ofa_weight: float = 1.0, label_smoothing: float = 0.1,
                 stages="all", head_blocks="auto", final_grid=OFA_FINAL_GRID):
        if not (stages == "all" or (not isinstance(stages, (str, int)) and len(stages) > 0
                                    and all(isinstance(i, int) for i in stages))):
            raise UserError(f"stages must be 'all' or a list of student stage indices, got "
                            f"{stages!r}", key="loss.stages", fix="e.g. loss.stages=all or "
                            "'loss.stages=[0,2]' (negative indices count from the last)")
        super().__init__(stages)
        if not float(eps) > 0:
            raise UserError(f"OFA eps must be > 0, got {eps}", key="loss.eps",
                            fix="use 1 (CIFAR; plain soft-label CE) or 1.5 (ImageNet)")
        if not float(temperature) > 0:
            raise UserError(f"OFA temperature must be > 0, got {temperature}",
                            key="loss.temperature", fix="use 1 (the official default)")
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}",
                            key="loss.label_smoothing", fix="use 0.1 (official) or 0")
        if not (head_blocks == "auto" or (isinstance(head_blocks, int) and head_blocks >= 0)):
            raise UserError(f"head_blocks must be 'auto' or an integer >= 0, got {head_blocks!r}",
                            key="loss.head_blocks", fix="use auto (official) or e.g. 1")
        if not (final_grid == "last" or (isinstance(final_grid, int)
                                         and not isinstance(final_grid, bool) and final_grid >= 1)):
            raise UserError(f"final_grid must be a grid side >= 1 or 'last', got {final_grid!r}",
                            key="loss.final_grid", fix="use 7 (official) or last")
        for key, w in (("gt_weight", gt_weight), ("kd_weight", kd_weight),
                       ("ofa_weight", ofa_weight)):
            if not float(w) >= 0:
                raise UserError(f"{key} must be >= 0, got {w}", key=f"loss.{key}", fix="e.g. 1")
        self.eps, self.temperature = float(eps), float(temperature)
        self.gt_weight, self.kd_weight = float(gt_weight), float(kd_weight)
        self.ofa_weight, self.label_smoothing = float(ofa_weight), float(label_smoothing)
        self.head_blocks = head_blocks
        self.final_grid = final_grid
        self.heads = nn.ModuleList()
        self.stage_ids: list[int] = []

    def bind(self, student, teacher, data) -> None:
        n = len(student.stages)
        if self.stages != "all" and any(not -n <= i < n for i in self.stages):
            raise UserError(f"loss.stages={self.stages} but the student has {n} stages",
                            key="loss.stages", fix=f"use indices in [-{n}, {n - 1}] or 'all'")
        self._probe = next(iter(data.val.eval_batches(2))).x
        try:
            super().bind(student, teacher, data)   # its checks first, then `build_heads`
        finally:
            del self._probe

    def build_heads(self, s_shapes, t_shapes, num_classes, student, teacher) -> None:
        # the projectors reduce every stage to the LAST student stage's resolution: read it
        was_training = student.training
        student.eval()
        with FeatureTaps(student, student.stages[-1:]) as taps, torch.no_grad():
            student(self._probe)
            last = _resolution(taps[student.stages[-1]].shape[1:], student)
        student.train(was_training)
        d_s, d_t = int(student.feature_dim), int(teacher.feature_dim)
        n = len(student.stages)
        self.stage_ids = [i for i, _ in self.pairs]
        heads = []
        for i, shape in zip(self.stage_ids, s_shapes):
            if len(shape) == 3:
                heads.append(map_head(shape, last, max(d_s, d_t), num_classes))
            elif len(shape) == 2:
                blocks = max(n - 1 - i, 1) if self.head_blocks == "auto" else self.head_blocks
                grid = token_grid(int(shape[0]), student)
                merges = (_halvings(min(grid), last) if self.final_grid == "last"
                          else official_merges(min(grid), int(self.final_grid)))
                heads.append(token_head(shape, grid, merges, d_s, int(blocks), num_classes))
            else:
                heads.append(vector_head(int(shape[0]), max(d_s, d_t), num_classes))
        self.heads = nn.ModuleList(heads)
        self.heads.apply(init_weights)
        self.heads.to(next(student.parameters()).device)

    def forward(self, student_logits, teacher_logits, targets, ctx=None, *, s_feats=None,
                t_feats=None, index=None) -> dict[str, torch.Tensor]:
        check_logits(student_logits, teacher_logits, targets, needs_teacher=True)
        s = _as_float(student_logits)
        hard = targets.argmax(dim=1) if targets.dim() == 2 else targets
        onehot = F.one_hot(hard, s.shape[1]).to(s.dtype)
        ce = F.cross_entropy(s, targets.to(s.dtype) if targets.dim() == 2 else targets,
                             label_smoothing=self.label_smoothing)
        kd = ofa_loss(s, teacher_logits, onehot, self.eps, self.temperature)
        terms = {}
        ofa = s.new_zeros(())
        for i, head, feat in zip(self.stage_ids, self.heads, s_feats or []):
            z = _as_float(head(feat))
            term = ofa_loss(z, teacher_logits, onehot, self.eps, self.temperature)
            terms[f"ofa_stage{i}"] = term.detach()
            ofa = ofa + term
        loss = self.gt_weight * ce + self.kd_weight * kd + self.ofa_weight * ofa
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "ofa": ofa.detach(), **terms}

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, temperature={self.temperature}, gt_weight={self.gt_weight}, "
                f"kd_weight={self.kd_weight}, ofa_weight={self.ofa_weight}, "
                f"label_smoothing={self.label_smoothing}, stages={self.stages}, "
                f"head_blocks={self.head_blocks}, final_grid={self.final_grid}")
