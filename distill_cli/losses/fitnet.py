"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015), as RepDistiller's `HintLoss` +
`ConvReg` (Tian et al. 2020) trains it: jointly with CE, no separate hint-training stage.

Also home of the helpers the map-based feature losses share (`as_map`, `token_grid`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.losses.ce import _as_float
from distill_cli.losses.features import FeatureObjective, pooled


# ------------------------------------------------------------------ shared shape helpers
def token_grid(n_tokens: int, model=None) -> tuple[int, int] | None:
    """The (h, w) patch grid of `n_tokens` row-major tokens: the model's `grid_size` when it has
    one that fits (non-square inputs), else a sqrt(N) x sqrt(N) square; None if neither fits."""
    grid = getattr(model, "grid_size", None)
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == n_tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n_tokens)
    return (side, side) if side * side == n_tokens else None


def feature_grid(shape, model, side: str, key: str) -> tuple[int, int] | None:
    """For a per-sample feature shape: the token grid for `[N, D]` tokens, None otherwise.
    Raises a UserError for tokens that lie on no grid (e.g. a CLS token was kept)."""
    if len(shape) != 2:
        return None
    grid = token_grid(int(shape[0]), model)
    if grid is None:
        raise UserError(f"The {side}'s tapped stage gives {int(shape[0])} tokens, which lie on no "
                        "square grid and the model declares no `grid_size`", key,
                        "Token stages must be [B, N, D] row-major over the patch grid without a "
                        "CLS token (the zoo's convention); pick other stages")
    return grid


def as_map(feat: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """`[B, C, H, W]` unchanged; tokens `[B, N, D]` -> `[B, D, h, w]` (row-major over `grid`, by
    default the sqrt(N) square)."""
    if feat.dim() == 3:
        b, n, d = feat.shape
        return feat.transpose(1, 2).reshape(b, d, *(grid or token_grid(n)))
    return feat


def fp32(t: torch.Tensor):
    """A context that turns autocast off: the losses' arithmetic runs in float32 under bf16."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def channels(shape) -> int:
    """Width of the pooled `[B, D]` feature of a per-sample shape (map C, tokens D, vector D)."""
    return int(shape[-1]) if len(shape) == 2 else int(shape[0])


# ------------------------------------------------------------------ the regressor
REGRESSORS = ("repdistiller", "ours")


class HintRegressor(nn.Module):
    """Maps a student stage onto the teacher's hint: `ReLU(BN(conv(F_s)))` (RepDistiller ConvReg).

    Maps (tokens are first laid out as `[B, D, h, w]` maps), student `(Hs, Ws)` -> teacher
    `(Ht, Wt)`, by `rule`:

    "repdistiller" (default) — RepDistiller `models/util.py` ConvReg, which decides on the
    HEIGHTS, in this order:
      Hs == 2·Ht                 3x3 conv, stride 2, padding 1
      2·Hs == Ht                 4x4 transposed conv, stride 2, padding 1
      Hs >= Ht                   conv with kernel (1 + Hs − Ht, 1 + Ws − Wt), no padding
                                 (equal sizes: a 1x1 conv)
      otherwise                  theirs raises; here a UserError (use rule "ours")
      A width the chosen layer does not bring to Wt (theirs would fail in the MSE) is a
      UserError too.
    "ours" — this project's earlier rule:
      equal sizes                    3x3 conv, stride 1, padding 1
      student k x larger (integer k) 3x3 conv, stride k, padding 1
      student exactly 2x smaller     4x4 transposed conv, stride 2, padding 1
      any other sizes                adaptive average pool to (Ht, Wt), then the 3x3 conv
    If either side is a vector `[B, D]`, both sides are `pooled` to `[B, D]` and the regressor is
    `ReLU(BN1d(Linear))` (either rule; RepDistiller has no vector hint). Conv/linear keep
    PyTorch's default init and bias, as RepDistiller.
    """

    def __init__(self, s_shape, t_shape, s_grid=None, t_grid=None, relu: bool = True,
                 rule: str = "repdistiller"):
        super().__init__()
        self.s_grid, self.t_grid = s_grid, t_grid
        self.vector = len(s_shape) == 1 or len(t_shape) == 1
        if self.vector:
            ct = channels(t_shape)
            self.conv = nn.Linear(channels(s_shape), ct)
            self.bn = nn.BatchNorm1d(ct)
        else:
            (cs, hs, ws), (ct, ht, wt) = _map_shape(s_shape, s_grid), _map_shape(t_shape, t_grid)
            build = _repdistiller_conv if rule == "repdistiller" else _resizing_conv
            self.conv = build(cs, (hs, ws), ct, (ht, wt))
            self.bn = nn.BatchNorm2d(ct)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        x = pooled(f_s) if self.vector else as_map(f_s, self.s_grid)
        return self.relu(self.bn(self.conv(x)))

    def target(self, f_t: torch.Tensor) -> torch.Tensor:
        """The teacher's hint in the regressor's output layout."""
        return pooled(f_t) if self.vector else as_map(f_t, self.t_grid)


def _map_shape(shape, grid) -> tuple[int, int, int]:
    if len(shape) == 2:
        return int(shape[1]), grid[0], grid[1]
    return int(shape[0]), int(shape[1]), int(shape[2])


def _repdistiller_conv(cs: int, s_hw, ct: int, t_hw) -> nn.Module:
    """RepDistiller ConvReg's layer (see `HintRegressor`); its output size is checked here
    because theirs only compares heights."""
    (hs, ws), (ht, wt) = s_hw, t_hw
    if hs == 2 * ht:
        conv, out_w = nn.Conv2d(cs, ct, 3, stride=2, padding=1), (ws + 1) // 2
    elif 2 * hs == ht:
        conv, out_w = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1), 2 * ws
    elif hs >= ht and ws >= wt:
        conv, out_w = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt)), wt
    else:
        conv, out_w = None, None
    if conv is None or out_w != wt:
        raise UserError(f"FitNet's RepDistiller regressor cannot map the student's {hs}x{ws} "
                        f"stage onto the teacher's {ht}x{wt} hint (its ConvReg handles a student "
                        "map 2x, 1/2x or at least as large as the teacher's, decided on the "
                        "heights)", "loss.regressor",
                        "Use loss.regressor=ours (adaptive pooling for any sizes), or pair other "
                        "stages (loss.stages)")
    return conv


def _resizing_conv(cs: int, s_hw, ct: int, t_hw) -> nn.Module:
    (hs, ws), (ht, wt) = s_hw, t_hw
    if (hs, ws) == (ht, wt):
        return nn.Conv2d(cs, ct, 3, padding=1)
    k = hs // ht
    if k >= 2 and (hs, ws) == (k * ht, k * wt):
        return nn.Conv2d(cs, ct, 3, stride=k, padding=1)   # out = floor((k*h - 1)/k) + 1 = h
    if (2 * hs, 2 * ws) == (ht, wt):
        return nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)   # out = 2*h
    return nn.Sequential(nn.AdaptiveAvgPool2d((ht, wt)), nn.Conv2d(cs, ct, 3, padding=1))


# ------------------------------------------------------------------ the objective
class FitNet(FeatureObjective):
    """FitNet: `ce_weight·CE(s, y) + feat_weight·Σ_pairs MSE(R(F_s), F_t)`.

    `R` is a trainable `HintRegressor` per stage pair (conv + BN + ReLU adapting channels AND
    spatial size by RepDistiller's ConvReg rule, or ours: `regressor`, see its docstring); MSE
    is the element mean (`nn.MSELoss`, RepDistiller `HintLoss`); the teacher's features carry no gradient. Trained jointly from step 0, as
    RepDistiller (`--distill hint -r 1 -a 0 -b 100`); the paper's separate stage-1 hint training
    is not done.

    stages: "middle" (default) = the student's middle stage `(n_stages - 1) // 2` paired with the
        teacher stage at the same relative depth: RepDistiller's `--hint_layer 2` indexes
        [stem, layer1, layer2, layer3, pool], i.e. layer2, the middle of a CIFAR ResNet's three
        stages (FitNets: "the middle layer" as guided/hint layer). Or a list of student stage
        indices (one regressor each, their MSEs summed), or "all".
    regressor: "repdistiller" (default; ConvReg: a 1x1 conv for equal sizes, the kernel
        (1 + Hs − Ht, 1 + Ws − Wt) for a larger student map, stride-2 conv / transposed conv for
        2x / 1/2x) or "ours" (3x3 convs, stride-k, adaptive pooling for any sizes).
    relu: the regressor's final ReLU (RepDistiller ConvReg). Teachers whose hint can be negative
        (ViT/mixer residual streams) cannot be matched through a ReLU: set relu=false there.
    Tokens `[B, N, D]` are laid out as maps `[B, D, h, w]` (row-major on the model's
    `grid_size`, else a sqrt(N) square) first.

    Terms: `loss`; `ce`; `hint` (Σ MSE before feat_weight).
    """

    needs_teacher = True

    def __init__(self, stages="middle", feat_weight: float = 100.0, ce_weight: float = 1.0,
                 relu: bool = True, regressor: str = "repdistiller"):
        middle = isinstance(stages, str) and stages == "middle"
        if isinstance(stages, str) and stages not in ("middle", "all"):
            raise UserError(f"FitNet stages={stages!r} is not an option", "loss.stages",
                            "Use middle, all, or a list of student stage indices, e.g. [1]")
        if regressor not in REGRESSORS:
            raise UserError(f"FitNet regressor={regressor!r} is not an option", "loss.regressor",
                            "Use repdistiller (RepDistiller's ConvReg, the default) or ours")
        super().__init__("all" if middle else stages)
        self.regressor = regressor
        self.middle = middle
        self.feat_weight, self.ce_weight, self.relu = float(feat_weight), float(ce_weight), bool(relu)
        self.regressors = nn.ModuleList()

    def bind(self, student, teacher, data) -> None:
        if self.middle:
            self.stages = [(len(student.stages) - 1) // 2]
        super().bind(student, teacher, data)

    def build_heads(self, s_shapes, t_shapes, num_classes, student=None, teacher=None) -> None:
        self.regressors = nn.ModuleList(
            HintRegressor(s, t, feature_grid(s, student, "student", "loss.stages"),
                          feature_grid(t, teacher, "teacher", "loss.stages"), self.relu,
                          self.regressor)
            for s, t in zip(s_shapes, t_shapes))

    def forward(self, student_logits, teacher_logits, targets, ctx: StepContext | None = None, *,
                s_feats, t_feats, index=None) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(_as_float(student_logits), targets)
        preds = [reg(f_s) for reg, f_s in zip(self.regressors, s_feats)]
        with fp32(ce):
            hint = sum(F.mse_loss(_as_float(p), _as_float(reg.target(f_t).detach()))
                       for reg, p, f_t in zip(self.regressors, preds, t_feats))
        loss = self.ce_weight * ce + self.feat_weight * hint
        return {"loss": loss, "ce": ce.detach(), "hint": hint.detach()}

    def extra_repr(self) -> str:
        return (f"stages={'middle' if self.middle else self.stages}, feat_weight={self.feat_weight}"
                f", ce_weight={self.ce_weight}, relu={self.relu}, regressor={self.regressor}")
