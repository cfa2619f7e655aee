"""`mlp`: flatten any input, hidden Linear-ReLU layers (optional dropout), linear classifier.

[B, in_channels, *input_size] -> flatten [B, in_channels * prod(input_size)]
-> hidden.0 [B, hidden[0]] -> ... -> hidden.k [B, hidden[k]] -> fc [B, num_classes].

Stages are the hidden layers' activations (`hidden.i`, 2-D tensors [B, width], not maps);
with `hidden: []` it is a linear model and its only stage is `flatten`. Dropout sits after
each activation, outside the tapped modules, so taps see the un-dropped features.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from distill_cli.models.registry import register


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128),
                 dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU())
                                    for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.stages = tuple(f"hidden.{i}" for i in range(len(hidden))) or ("flatten",)
        self.feature_dim = widths[-1]
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for layer in self.hidden:
            x = self.dropout(layer(x))
        return self.fc(x)


@register("mlp", input_dims=None)
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *,
          hidden: Sequence[int] = (256, 128), dropout: float = 0.0) -> MLP:
    in_features = in_channels * math.prod(input_size)
    return MLP(in_features, num_classes, [int(h) for h in hidden], float(dropout))
