"""The model zoo: `create(arch, num_classes, in_channels, input_size, **options)`.

Every architecture registers itself in `ARCHS` when its family module is imported below; see
`registry` for the contract every model satisfies (`stages`, `feature_dim`, `classifier`) and
`FeatureTaps` for reading stage outputs.
"""
from distill_cli.models.registry import ARCHS, create, register
from distill_cli.models.taps import ClassifierInput, FeatureTaps, prepool_path

# Imported for their @register side effect; one module per family.
from distill_cli.models import (  # noqa: E402,F401  isort: skip
    cnn, cnn1d, convnet, gpt, mixer, mlp, mobilenetv2, resnet18_cifar, resnet_cifar, shufflenetv1,
    shufflenetv2, tv, vgg, vit, wrn,
)
from distill_cli.models.diffusion import dit, unet  # noqa: E402,F401  isort: skip

__all__ = ["ARCHS", "ClassifierInput", "FeatureTaps", "create", "prepool_path", "register"]
