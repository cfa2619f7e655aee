"""ShuffleNetV1 for CIFAR as used by RepDistiller (`ShuffleV1`: groups 3, widths 240/480/960,
4/8/4 blocks).

Bottleneck units: grouped 1x1 conv - channel shuffle - 3x3 depthwise - grouped 1x1 conv; a
stride-2 unit concatenates a 3x3 average-pooled shortcut instead of adding it. The stem is a
1x1 conv to 24 channels at full resolution (RepDistiller's CIFAR choice: no early downsampling).

Shapes for 32x32: stem [B, 24, 32, 32] -> layer1 [B, 240, 16, 16] -> layer2 [B, 480, 8, 8]
-> layer3 [B, 960, 4, 4] -> pool [B, 960] -> linear. Stride-2 units keep a 1x1 map 1x1, so
8x8 inputs work. Init is PyTorch's default, as in RepDistiller (which sets none here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.models.registry import register


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> interleave the g groups so the next grouped conv mixes them."""
    n, ch, h, w = x.shape
    return x.view(n, groups, ch // groups, h, w).transpose(1, 2).reshape(n, ch, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        g = 1 if cin == 24 else groups  # the 24-channel stem output is too thin to group
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 2:  # padding 1 keeps the pooled shortcut the same size as the conv branch
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]; stages layer1..3, head `linear`."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 widths: tuple[int, ...] = (240, 480, 960), blocks: tuple[int, ...] = (4, 8, 4),
                 groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, blocks), start=1):
            units = []
            for j in range(n):
                # the first unit concatenates its input, so its conv branch makes cout - cin
                units.append(Bottleneck(cin, cout - cin if j == 0 else cout, 2 if j == 0 else 1,
                                        groups))
                cin = cout
            self.add_module(f"layer{i}", nn.Sequential(*units))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.stages = tuple(f"layer{i}" for i in range(1, len(widths) + 1))
        self.feature_dim = widths[-1]
        self.classifier = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for s in self.stages:
            x = getattr(self, s)(x)
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register("shufflenetv1")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...]) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, in_channels)
