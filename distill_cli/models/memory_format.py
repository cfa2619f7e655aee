"""Which memory format a run's networks use (`trainer.channels_last`).

NHWC lets oneDNN (CPU) and cuDNN (CUDA) pick faster convolution kernels. Measured on this
project's 2-core CPU (Fashion-MNIST, 4,096 images, 1 epoch of CE, images/s NCHW → NHWC):
cnn_small 3,956 → 6,607, resnet8 1,473 → 1,888, mobilenetv2 642 → 1,157, shufflenetv1
138 → 185, vit_tiny (conv patch embedding) 363 → 435, wrn_16_2 278/242 → 263/317 and
shufflenetv2 229/205 → 210/206 (two runs each: within run-to-run noise). No conv net was
reliably slower, so `auto` means NHWC for every network with a 2-D convolution on image inputs.
"""
from __future__ import annotations

from torch import nn

from distill_cli.errors import UserError


def channels_last_for(setting, input_shape, model: nn.Module) -> bool:
    """`setting` is `trainer.channels_last`: true | false | auto. Only image inputs (C, H, W)
    have an NHWC layout; `auto` also needs a 2-D convolution in `model`."""
    if setting not in (True, False, "auto"):
        raise UserError(f"trainer.channels_last={setting!r} is not an option",
                        "trainer.channels_last", "Use auto (the default), true or false")
    if len(input_shape) != 3 or setting is False:
        return False
    return setting is True or any(isinstance(m, nn.Conv2d) for m in model.modules())
