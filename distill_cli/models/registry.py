"""The model zoo's one registry: architecture name -> builder.

A builder is `fn(num_classes, in_channels, input_size, **options) -> nn.Module`. Every module a
builder returns satisfies the zoo contract, checked by `create`:

* `forward(x)` returns logits `[B, num_classes]` and nothing else (features: `FeatureTaps`);
* `stages: tuple[str, ...]` dotted module paths of the stage outputs, in forward order. For the
  RepDistiller families they are RepDistiller's feature points `feat[1:-1]` (`preact=False`:
  the block outputs AT and FitNet read, pre- or post-activation exactly as theirs), so WRN's
  last stage is block3's raw output and MobileNetV2 / ShuffleNetV2 / VGG have no stage for the
  1x1 conv (or stem) RepDistiller does not tap. Elsewhere the last stage is the final map that
  gets pooled. The pooled penultimate vector is the classifier's input
  (`taps.ClassifierInput`), the map it is pooled from `taps.prepool_path(model)` (a model whose
  last stage is not that map names it in an optional `prepool` attribute);
* `feature_dim: int` width of the pooled feature fed to the final linear layer;
* `classifier: str` module path of that final linear layer.

Families live one per file and register their names with `@register("name")` at import time
(`distill_cli.models.__init__` imports them all).
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

from torch import nn

from distill_cli.errors import UserError

ARCHS: dict[str, Callable[..., nn.Module]] = {}

_FIXED = ("num_classes", "in_channels", "input_size")


def register(name: str, *, input_dims: int | None = 2):
    """Decorator: file `fn` under `name`. `input_dims` is how many sizes `input_size` must have
    (2 for images, 1 for signals such as MNIST-1D, None for "any", e.g. an MLP)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHS:
            raise ValueError(f"architecture {name!r} is registered twice")
        fn.input_dims = input_dims
        ARCHS[name] = fn
        return fn

    return deco


def create(arch: str, num_classes: int, in_channels: int, input_size: Sequence[int],
           **kwargs) -> nn.Module:
    """Build zoo architecture `arch` for a dataset with `num_classes` classes and inputs of shape
    `[B, in_channels, *input_size]`; `kwargs` are the architecture's own options (e.g. `hidden`
    for `mlp`, `name` for `tv`). Raises `UserError` for an unknown name or option."""
    builder = ARCHS.get(arch)
    if builder is None:
        raise UserError(f"Unknown architecture {arch!r}", key="arch",
                        fix=f"choose one of: {', '.join(sorted(ARCHS))}")
    input_size = tuple(int(s) for s in input_size)  # also accepts an OmegaConf ListConfig
    dims = builder.input_dims
    if dims is not None and len(input_size) != dims:
        fitting = sorted(a for a, b in ARCHS.items() if b.input_dims in (None, len(input_size)))
        raise UserError(
            f"Architecture {arch!r} takes {dims}-D inputs but the dataset's samples have size "
            f"{input_size}", key="arch", fix=f"choose one of: {', '.join(fitting)}")
    sig = inspect.signature(builder)
    try:
        sig.bind(num_classes, in_channels, input_size, **kwargs)
    except TypeError as err:
        options = [p for p in sig.parameters if p not in _FIXED
                   and sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
        raise UserError(f"Architecture {arch!r}: {err}", key="arch",
                        fix=f"its options are: {', '.join(options) or 'none'}") from None
    model = builder(int(num_classes), int(in_channels), input_size, **kwargs)
    _check_contract(arch, model)
    return model


def _check_contract(arch: str, model: nn.Module) -> None:
    """Catch a zoo bug at build time rather than in a distillation method (not a user error)."""
    stages, feature_dim, head = (getattr(model, a, None)
                                 for a in ("stages", "feature_dim", "classifier"))
    if not (isinstance(stages, tuple) and stages and isinstance(feature_dim, int)
            and isinstance(head, str)):
        raise TypeError(f"zoo model {arch!r} lacks stages/feature_dim/classifier")
    for path in (*stages, head, *([model.prepool] if getattr(model, "prepool", None) else [])):
        model.get_submodule(path)  # AttributeError names the bad path


def kaiming_init_(model: nn.Module) -> None:
    """RepDistiller's init for conv nets: He-normal convs with fan_out (= N(0, 2/(k*k*out))),
    zero conv biases, BatchNorm scale 1 and shift 0. Linear layers are left to each family."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
