"""ConvNet-D: the network of the dataset-distillation literature (DC, DSA, DM, MTT, DataDAM).

Source: VICO-UoE/DatasetCondensation@53f63a6 networks.py:36-111 (`ConvNet`) and utils.py:118-131
(`get_default_convnet_setting`: width 128, depth 3, relu, instancenorm, avgpooling).

    depth x [Conv3x3(width, pad 1) -> norm -> act -> pool 2x2]  ->  flatten  ->  Linear

* `features` is ONE flat nn.Sequential of those modules (as the authors'), so objectives can
  hook every activation (DataDAM) and `embed(x)` is the flattened output of `features`
  (DM's 2048-d embedding for ConvNet-3 on 32x32).
* norm: `instancenorm` = GroupNorm(width, width, affine) (theirs: per-channel instance norm with
  a learned affine), `batchnorm` = BatchNorm2d, `layernorm` = LayerNorm([width, h, w]) over the
  whole map with elementwise affine (theirs: nn.LayerNorm(shape_feat)), `groupnorm` =
  GroupNorm(4, width), `none`.
* act: relu | leakyrelu (slope 0.01) | sigmoid | swish (x * sigmoid(x)); never in place (theirs
  is `ReLU(inplace=True)`; ours is not, so forward hooks see the activation itself and autograd
  never needs the clone DataDAM's code makes).
* pool: avgpool | maxpool (2x2, stride 2) | none; `avgpooling` / `maxpooling` (the authors'
  spellings) are accepted too.
* 28x28 inputs: the first conv uses padding 3 so the first map is 32x32, as theirs. Deviation:
  the authors' condition is `channel == 1` (only ever MNIST-like 28x28 data in their code, and
  their shape bookkeeping assumes 28 -> 32), ours is "the input is 28x28"; the two agree on every
  input their code supports, and ours keeps 8x8 digits or 32x32 grayscale at their true size.
* Initialisation: PyTorch's defaults, as theirs (no custom init).

Shapes (ConvNet-3, width 128): 3x32x32 -> 128x4x4 = 2048 features; 1x28x28 -> 32x32 -> 2048;
1x8x8 (sklearn digits) -> 128x1x1 = 128.
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.registry import register

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "leakyrelu", "sigmoid", "swish")
POOLS = {"avgpool": "avgpool", "maxpool": "maxpool", "none": "none",
         "avgpooling": "avgpool", "maxpooling": "maxpool"}


def _norm(kind: str, channels: int, h: int, w: int) -> nn.Module | None:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "layernorm":
        return nn.LayerNorm([channels, h, w], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return None


def _act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if kind == "sigmoid":
        return nn.Sigmoid()
    return nn.SiLU()  # swish: x * sigmoid(x), the authors' Swish


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int],
                 width: int, depth: int, norm: str, act: str, pool: str):
        super().__init__()
        h, w = input_size
        first_pad = 3 if (h, w) == (28, 28) else 1   # the authors' 28 -> 32 rule
        layers: list[nn.Module] = []
        stages = []
        cin = in_channels
        for d in range(depth):
            pad = first_pad if d == 0 else 1
            layers.append(nn.Conv2d(cin, width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if d == 0:
                self.first_map = (h, w)  # 32x32 for 28x28 inputs (tests read it)
            norm_layer = _norm(norm, width, h, w)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_act(act))
            if pool != "none":
                layers.append(nn.MaxPool2d(2, 2) if pool == "maxpool" else nn.AvgPool2d(2, 2))
                h, w = h // 2, w // 2
            stages.append(f"features.{len(layers) - 1}")
            cin = width
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, h, w)
        # The authors call the Linear `classifier`; the zoo contract (registry.py) reserves
        # that name for the module PATH of the final linear layer, so the Linear is `fc`.
        self.fc = nn.Linear(width * h * w, num_classes)
        self.classifier = "fc"
        self.stages = tuple(stages)      # each block's last module (pool, or act if pool=none)
        self.feature_dim = width * h * w  # the flattened last map feeds `fc` (no global pool)
        # Unlike the rest of the zoo, the classifier reads the last map FLATTENED, not averaged
        # (ClassifierInput == taps[prepool_path].flatten(1)); the two agree only on a 1x1 map.
        self.head_reads = "flatten"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of `features` ([B, width*h*w]): DM's / DataDAM's embedding."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def _check(name: str, value: str, allowed) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise UserError(f"Architecture 'convnet': {name}={value!r} is not supported", key=name,
                        fix=f"set student.{name} (or teacher.{name}, task.net.{name}) to one of: "
                            f"{', '.join(allowed)}")
    return value


@register("convnet")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          width: int = 128, depth: int = 3, norm: str = "instancenorm", act: str = "relu",
          pool: str = "avgpool") -> nn.Module:
    norm, act = _check("norm", norm, NORMS), _check("act", act, ACTS)
    pool = POOLS[_check("pool", pool, tuple(POOLS))]
    for key, value in (("width", width), ("depth", depth)):
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise UserError(f"Architecture 'convnet': {key}={value!r}", key=key,
                            fix=f"set student.{key} (or teacher.{key}, task.net.{key}) to a "
                                "whole number >= 1")
    width, depth = int(width), int(depth)
    if norm == "groupnorm" and width % 4:
        raise UserError(f"Architecture 'convnet': norm=groupnorm needs a width divisible by 4, "
                        f"got width={width}", key="width",
                        fix="set the width to a multiple of 4 or choose another norm")
    h, w = (int(s) for s in input_size)
    size = min(h, w) + (4 if (h, w) == (28, 28) else 0)
    max_depth = None
    if pool != "none":   # each block halves the map (floor); a 1x1 map cannot be pooled again
        max_depth, s = 0, size
        while s >= 2:
            s //= 2
            max_depth += 1
    if max_depth is not None and depth > max_depth:
        raise UserError(
            f"Architecture 'convnet': depth={depth} pools the {h}x{w} inputs below 1x1 (each "
            f"block halves the map; at most {max_depth} blocks fit)", key="depth",
            fix=f"set student.depth (or teacher.depth, task.net.depth) to {max_depth} or less, "
                "or pool=none")
    return ConvNet(num_classes, in_channels, (h, w), width, depth, norm, act, pool)
