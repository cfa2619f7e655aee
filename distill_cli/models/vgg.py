"""CIFAR VGGs with BatchNorm as used by RepDistiller (`vgg8_bn`, `vgg13_bn`): the convolutional
part of VGG in five blocks, no FC stack, global average pool, one linear layer.

Shapes for 32x32: block0 [B, 64, 32, 32] -> pool -> block1 [B, 128, 16, 16] -> pool
-> block2 [B, 256, 8, 8] -> pool -> block3 [B, 512, 4, 4] -> block4 [B, 512, 4, 4]
-> pool [B, 512] -> fc.

Pooling rule (generalises RepDistiller, identical for 32 and 64 px): the 2x2 max-pools after
blocks 0-2 are skipped once the map is 1 px (8x8 inputs reach 1x1 after three pools); the pool
after block3 runs only while the map is larger than 4 px (RepDistiller: only for 64 px inputs),
so block4 sees 4x4 at 32 and 64 px and a proportionally larger map for larger inputs.

Stages are block1..block4 (each block's ReLU'd output, before its pool): RepDistiller's
`feat[1:5]` (`is_feat=True, preact=False`), what AT (`feat[1:-1]`) and FitNet (`feat[2]` = the
middle stage) read. block0 (its `f0`, the stem's counterpart) is not a stage.

Differences from RepDistiller: the linear layer is `fc` (RepDistiller: `classifier`, which
is the contract's attribute naming the head path here); each block keeps its final ReLU
(RepDistiller applies it outside), which adds no parameters, so other state dict keys match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.models.registry import kaiming_init_, register

_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _block(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:  # conv keeps its bias, as in RepDistiller (counted in its 9.46M / 3.96M)
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]; stages block1..block4, head `fc`."""

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int, in_channels: int = 3):
        super().__init__()
        cins = (in_channels,) + tuple(c[-1] for c in cfg[:-1])
        for i, (cin, widths) in enumerate(zip(cins, cfg)):
            self.add_module(f"block{i}", _block(cin, widths))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[-1][-1], num_classes)
        kaiming_init_(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)
        self.blocks = tuple(f"block{i}" for i in range(len(cfg)))
        self.stages = self.blocks[1:]   # RepDistiller feat[1:-1]: block0 is the stem's f0
        self.feature_dim = cfg[-1][-1]
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *early, last = [getattr(self, s) for s in self.blocks]
        for i, block in enumerate(early):
            x = block(x)
            min_side = 4 if i == len(early) - 1 else 1
            if min(x.shape[-2:]) > min_side:
                x = F.max_pool2d(x, 2, 2)
        x = last(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _builder(cfg: tuple[tuple[int, ...], ...]):
    def build(num_classes: int, in_channels: int, input_size: tuple[int, ...]) -> VGG:
        return VGG(cfg, num_classes, in_channels)
    return build


for _name, _cfg in _CONFIGS.items():
    register(_name)(_builder(_cfg))
