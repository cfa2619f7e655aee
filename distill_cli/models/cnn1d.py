"""`cnn1d`: a small 1-D CNN for MNIST-1D signals ([B, 1, 40]), after the MNIST-1D paper's
ConvBase (Greydanus 2020: three convs of 25 channels, kernel 5 then 3, stride 2), with BatchNorm
and a global average pool in place of the flatten, so any signal length works.

Shapes for length 40: layers.0 [B, 25, 20] -> layers.1 [B, 25, 10] -> layers.2 [B, 25, 5]
-> pool [B, 25] -> fc [B, num_classes]. Stages are the three conv blocks (3-D tensors).
Padding is kernel // 2 so each stride-2 conv exactly halves the length (rounding up).
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.models.registry import kaiming_init_, register


class CNN1d(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, channels: int = 25,
                 depth: int = 3):
        super().__init__()
        blocks, cin = [], in_channels
        for i in range(depth):
            k = 5 if i == 0 else 3
            blocks.append(nn.Sequential(nn.Conv1d(cin, channels, k, stride=2, padding=k // 2,
                                                  bias=False),
                                        nn.BatchNorm1d(channels), nn.ReLU()))
            cin = channels
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(channels, num_classes)
        kaiming_init_(self)
        self.stages = tuple(f"layers.{i}" for i in range(depth))
        self.feature_dim = channels
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


@register("cnn1d", input_dims=1)
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          channels: int = 25, depth: int = 3) -> CNN1d:
    return CNN1d(num_classes, in_channels, int(channels), int(depth))
