"""CIFAR ResNets (He et al. 2016, sec. 4.2) as used by RepDistiller / mdistiller.

Depth 6n+2: a 3x3 stem, then three stages of n BasicBlocks at strides 1, 2, 2, global average
pool, linear. `resnetN` has widths 16 -> 16/32/64; the `x4` variants a 32-channel stem and
stages of 64/128/256. Module names follow RepDistiller, so its checkpoints load
(`conv1, bn1, layer1..3, fc`).

Shapes for a 32x32 input: stem [B, w0, 32, 32] -> layer1 [B, w1, 32, 32] -> layer2 [B, w2, 16, 16]
-> layer3 [B, w3, 8, 8] -> pool [B, w3] -> fc [B, num_classes]. Any input >= 8 px works: the
pool is adaptive, and stride-2 3x3 convs with padding 1 never shrink a map below 1x1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.models.registry import kaiming_init_, register


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # padding 1 keeps the size at stride 1 and halves it (rounding up) at stride 2
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu. The shortcut is a 1x1 conv + BN (option B) when
    the shape changes. No in-place ops: a tap on any inner module sees its true output."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]; stages layer1..3, head `fc`."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "BasicBlock CIFAR ResNets have depth 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # RepDistiller's AvgPool2d(8), for any input size
        self.fc = nn.Linear(widths[3], num_classes)  # PyTorch's default init, as RepDistiller
        kaiming_init_(self)
        self.stages = ("layer1", "layer2", "layer3")
        self.feature_dim = widths[3]
        self.classifier = "fc"

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                               for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (depth, widths); the published figures for CIFAR-100 are in tests/test_models.py
_CONFIGS = {
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _builder(depth: int, widths: tuple[int, int, int, int]):
    def build(num_classes: int, in_channels: int, input_size: tuple[int, ...]) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels)
    return build


for _name, (_depth, _widths) in _CONFIGS.items():
    register(_name)(_builder(_depth, _widths))
