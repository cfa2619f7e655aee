"""`resnet18_cifar`: the ResNet-18 of the CIFAR KD papers (RepDistiller `models/resnetv2.py`
`ResNet18`, also mdistiller's CIFAR "ResNet18"; kuangliu/pytorch-cifar lineage).

A 3x3 stride-1 stem conv to 64 channels + BN + ReLU, NO max-pool, four stages of two BasicBlocks
(`resnet_cifar.BasicBlock`: 1x1 conv + BN shortcut when the shape changes) of widths 64/128/256/512
at strides 1/2/2/2, global average pool, Linear 512 -> num_classes. 11,220,132 parameters for
CIFAR-100 (3 channels, 100 classes), RepDistiller's count.

Shapes for 32x32: stem [B, 64, 32, 32] -> layer1 [B, 64, 32, 32] -> layer2 [B, 128, 16, 16]
-> layer3 [B, 256, 8, 8] -> layer4 [B, 512, 4, 4] -> pool [B, 512] -> fc. 28 px (Fashion-MNIST,
`in_channels` 1) gives 28/14/7/4 and 8 px digits 8/4/2/1: stride-2 3x3 convs with padding 1 round
up and the pool is adaptive.

Differences from RepDistiller: the head is `fc` (theirs `linear`) and the block shortcut
`downsample` (theirs `shortcut`), as in the rest of this zoo, so their state dicts need renaming.
Init as theirs: He-normal fan_out convs, BN 1/0, PyTorch's default Linear, no zero-init residual.
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.models.registry import kaiming_init_, register
from distill_cli.models.resnet_cifar import BasicBlock


class ResNet18Cifar(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]; stages layer1..4, head `fc`."""

    widths = (64, 128, 256, 512)
    depths = (2, 2, 2, 2)

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        for i, (width, n, stride) in enumerate(zip(self.widths, self.depths, (1, 2, 2, 2)), 1):
            self.add_module(f"layer{i}", nn.Sequential(
                *(BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1)
                  for j in range(n))))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        kaiming_init_(self)
        self.stages = ("layer1", "layer2", "layer3", "layer4")
        self.feature_dim = 512
        self.classifier = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet18_cifar")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...]) -> ResNet18Cifar:
    return ResNet18Cifar(num_classes, in_channels)
