"""MobileNetV2 for CIFAR as used by RepDistiller (`mobile_half`: expansion 6, width 0.5).

Inverted residual blocks (1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when
the shape is kept) in seven groups `blocks.0..6`, then a 1x1 conv to 1280 channels, global
average pool and linear. The stem is a stride-2 conv, as in RepDistiller (total stride 16).

Shapes at width 0.5 for 32x32: conv1 [B, 16, 16, 16] -> blocks.1 [B, 12, 16, 16]
-> blocks.2 [B, 16, 8, 8] -> blocks.4 [B, 48, 4, 4] -> blocks.6 [B, 160, 2, 2]
-> conv2 [B, 1280, 2, 2] -> pool [B, 1280] -> fc.
Stages are RepDistiller's feature points `feat[1:5]` (blocks.1, .2, .4, .6: linear-bottleneck
outputs, no activation), what AT (`feat[1:-1]`) and FitNet (`feat[2]` = blocks.2, the middle
stage) read. conv2, the 1280-channel map that is pooled, is not a stage (RepDistiller has none
there); the pooled vector is the classifier's input (`models.taps.ClassifierInput`).
An 8x8 input goes down to 1x1 (stride-2 3x3 convs with padding 1 keep a 1x1 map 1x1).

Differences from RepDistiller: the linear layer is `fc` (RepDistiller: `classifier.0`).
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.models.registry import kaiming_init_, register


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(),
            # linear bottleneck: no ReLU after the projection (it would destroy information)
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]."""

    # expansion t (None: the model's `expand`), width c, repeats n, first stride s
    SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
               (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5,
                 expand: int = 6):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, stride=2)
        blocks = []
        for t, c, n, s in self.SETTING:
            cout = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(cin, cout, s if i == 0 else 1, t or expand))
                cin = cout
            blocks.append(nn.Sequential(*group))
        self.blocks = nn.ModuleList(blocks)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280  # RepDistiller's rule
        self.conv2 = _conv_bn_relu(cin, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        kaiming_init_(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)
        self.stages = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")   # RepDistiller feat[1:5]
        self.prepool = "conv2"   # the map that is pooled (taps.prepool_path)
        self.feature_dim = last
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("mobilenetv2")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          width_mult: float = 0.5, expand: int = 6) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, float(width_mult), int(expand))
