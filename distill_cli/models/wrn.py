"""Wide ResNets (Zagoruyko & Komodakis 2016) as used by RepDistiller: WRN-d-k.

Pre-activation BasicBlocks (bn-relu-conv-bn-relu-conv), depth 6n+4, widths 16 -> 16k/32k/64k at
strides 1, 2, 2, then a final bn-relu, global average pool and linear. Module names follow
RepDistiller (`conv1, block1..3.layer.i, bn1, relu, fc`), so its checkpoints load.

Shapes for 32x32: conv1 [B, 16, 32, 32] -> block1 [B, 16k, 32, 32] -> block2 [B, 32k, 16, 16]
-> block3 [B, 64k, 8, 8] -> bn1+relu (same) -> pool [B, 64k] -> fc.

Stages are ("block1", "block2", "block3"), the RAW block outputs, as RepDistiller's `feat[1:4]`
(`is_feat=True, preact=False`, which AT/FitNet read): in this pre-activation net no block output
has an activation; the final bn1-relu (what gets pooled) is not a stage. The pooled vector is the
classifier's input (RepDistiller `feat[-1]`; `models.taps.ClassifierInput`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.models.registry import kaiming_init_, register


class BasicBlock(nn.Module):
    """Pre-activation block. When the shape changes, the shortcut (1x1 conv) and the residual
    branch both start from the shared bn-relu'd input, as in the original WRN code."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride,
                                                                     bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """n BasicBlocks; only the first changes width/stride. Kept as a wrapper (`.layer`) so state
    dict keys match RepDistiller's."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout,
                                                stride if i == 0 else 1, drop_rate)
                                     for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth is 6n+4"
        n = (depth - 4) // 6
        w = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, w[1], w[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, w[2], w[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        kaiming_init_(self)
        nn.init.zeros_(self.fc.bias)  # RepDistiller zeroes the linear bias, keeps its weight init
        self.stages = ("block1", "block2", "block3")   # RepDistiller feat[1:4]
        self.prepool = "relu"   # the map that is pooled (taps.prepool_path)
        self.feature_dim = w[3]
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _builder(depth: int, widen: int):
    def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
              drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, drop_rate)
    return build


for _depth, _widen in ((16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_widen}")(_builder(_depth, _widen))
