"""A plain VGG-style CNN for small images (Fashion-MNIST, digits): the fast CPU benchmark pair.

Each stage is `convs_per_stage` × (3x3 conv, BN, ReLU) then a 2x2 max-pool — skipped once the
map is down to 1 px, so 8x8 digits work as well as 28x28 or 32x32 images. Global average pool,
dropout, linear. Defaults (32/64/128, two convs a stage) give a ~290k-parameter teacher;
`cnn_small` (16/32/64, one conv) a ~24k-parameter student.

Shapes for 1x28x28: stage1 [B,c1,14,14] -> stage2 [B,c2,7,7] -> stage3 [B,c3,3,3] -> pool [B,c3].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from distill_cli.models.registry import kaiming_init_, register


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, input_size: tuple[int, int],
                 channels: Sequence[int], convs_per_stage: int, dropout: float):
        super().__init__()
        size = min(input_size)
        cin = in_channels
        names = []
        for i, cout in enumerate(channels, start=1):
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU()]
                cin = cout
            if size >= 2:  # never pool a 1x1 map away
                layers.append(nn.MaxPool2d(2))
                size //= 2
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            names.append(f"stage{i}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self.stages = tuple(names)
        self.feature_dim = cin
        self.classifier = "fc"
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


@register("cnn")
def cnn(num_classes: int, in_channels: int, input_size: tuple[int, int],
        channels: Sequence[int] = (32, 64, 128), convs_per_stage: int = 2,
        dropout: float = 0.0) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, input_size, tuple(channels), int(convs_per_stage),
                    float(dropout))
