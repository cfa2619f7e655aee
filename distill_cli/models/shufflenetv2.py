"""ShuffleNetV2 1x for CIFAR as used by RepDistiller (`ShuffleV2`: widths 116/232/464, 3/7/3
units, 1x1 conv to 1024).

A unit splits the channels in half, transforms one half (1x1 - 3x3 depthwise - 1x1),
concatenates and shuffles; a down-sampling unit runs two strided branches on the full input.
The stem is a 1x1 conv to 24 channels at full resolution (RepDistiller's CIFAR choice).

Shapes for 32x32: stem [B, 24, 32, 32] -> layer1 [B, 116, 16, 16] -> layer2 [B, 232, 8, 8]
-> layer3 [B, 464, 4, 4] -> conv2/bn2/relu2 [B, 1024, 4, 4] -> pool [B, 1024] -> linear.
Stages: layer1..3 (each layer's last unit's shuffled output), RepDistiller's `feat[1:4]`, what
AT and FitNet read. The 1024-channel conv2/bn2/relu2 map that is pooled is not a stage
(RepDistiller has none there); the pooled vector is the classifier's input
(`models.taps.ClassifierInput`). Init is PyTorch's default, as in RepDistiller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.models.registry import register
from distill_cli.models.shufflenetv1 import ShuffleBlock


class BasicBlock(nn.Module):
    """Keeps shape: x = [x1 | x2] -> shuffle([x1 | branch(x2)])."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Halves the resolution: two stride-2 branches on the whole input, concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        # left: 3x3 depthwise (stride 2) - 1x1
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1 - 3x3 depthwise (stride 2) - 1x1
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 widths: tuple[int, ...] = (116, 232, 464, 1024),
                 blocks: tuple[int, ...] = (3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, blocks), start=1):
            units = [DownBlock(cin, cout), *(BasicBlock(cout) for _ in range(n))]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            cin = cout
        self.conv2 = nn.Conv2d(cin, widths[-1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[-1])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        # RepDistiller's feat[1:4]: conv2/bn2/relu2 (the pooled map) is not a stage
        self.stages = tuple(f"layer{i}" for i in range(1, len(blocks) + 1))
        self.prepool = "relu2"   # the map that is pooled (taps.prepool_path)
        self.feature_dim = widths[-1]
        self.classifier = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for s in self.stages:
            x = getattr(self, s)(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register("shufflenetv2")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...]) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_channels)
