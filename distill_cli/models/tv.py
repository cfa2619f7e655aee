"""`tv`: any torchvision classification model, `torchvision.models.get_model(name, ...)`.

Options: `name` (required, e.g. resnet18, mobilenet_v3_small), `weights` (default None: random
init; e.g. IMAGENET1K_V1 or DEFAULT, needs the file in $TORCH_HOME or internet). Any other
option goes to torchvision's builder (e.g. `image_size` for ViT).

The torchvision network is wrapped as `TorchvisionNet.net` (several torchvision models own a
submodule called `classifier`, which the contract uses for the head's path), so every path
starts with `net.`. The wrapper derives the contract attributes:

* `classifier`: the last Linear (or 1x1 conv, SqueezeNet) producing the class logits.
* `feature_dim`: that layer's input width. For models with an MLP head (VGG, AlexNet,
  MobileNetV3, MaxViT) it is the MLP's last hidden width, not the last stage's channel count.
* `stages`: ResNet-style models (layer1..layer4) use those. Otherwise one dry forward (eval
  mode, zeros, no grad) at the dataset's input size runs over the children of the body
  (`features`, `trunk_output`, `layers` or `blocks`; else the top-level children without the
  head), and a stage is the last child before the resolution shrinks (by a quarter or more),
  plus the last child.
  Taps are then 4-D except: Swin (channels-last [B, H, W, C]) and ViT (tokens [B, N, D]).

`in_channels != 3`: the first 3-channel conv is replaced by an `in_channels` one; pretrained
weights are averaged over RGB and spread over the new channels (same response to a gray image),
random ones are reused channel-cyclically so the model's own init scheme is kept.
A model that cannot run at the dataset's input size (e.g. ViT's fixed 224 px, AlexNet and
Inception below ~64-75 px) fails at build time with a UserError.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.registry import register
from distill_cli.models.taps import FeatureTaps

_BODIES = ("features", "trunk_output", "layers", "blocks")
# children that are pooling/regularisation glue, never a stage
_GLUE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Flatten, nn.Identity)


class TorchvisionNet(nn.Module):
    """[B, in_channels, H, W] -> logits [B, num_classes]; the network is `self.net`."""

    def __init__(self, net: nn.Module, stages: tuple[str, ...], feature_dim: int, head: str):
        super().__init__()
        self.net = net
        self.stages = tuple(f"net.{s}" for s in stages)
        self.feature_dim = feature_dim
        self.classifier = f"net.{head}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        # GoogLeNet/Inception return (logits, aux...) in training if built with aux heads
        return out if isinstance(out, torch.Tensor) else out[0]


@register("tv")
def build(num_classes: int, in_channels: int, input_size: tuple[int, ...], *, name: str,
          weights: str | None = None, **options) -> TorchvisionNet:
    # imported here, not at the top: every `distill` start imported torchvision for this one
    # architecture (~0.3 s of its own here, beside the torch._dynamo it shares with torch.optim)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=3)
        raise UserError(f"torchvision has no classification model {name!r}", key="name",
                        fix=f"choose one of: {', '.join(close or known)}")
    if name in ("googlenet", "inception_v3"):
        options.setdefault("aux_logits", False)  # auxiliary heads are not part of the contract
    net, classes = _load(name, weights, num_classes, options)
    head = _find_head(net, classes)
    if classes != num_classes:  # pretrained head: keep the backbone, new head for this dataset
        old = net.get_submodule(head)
        new = (nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear)
               else nn.Conv2d(old.in_channels, num_classes, 1))
        net.set_submodule(head, new)
    if in_channels != 3:
        _adapt_first_conv(net, name, in_channels, pretrained=weights is not None)
    head_module = net.get_submodule(head)
    feature_dim = getattr(head_module, "in_features", None) or head_module.in_channels
    stages = _derive_stages(net, name, head, in_channels, input_size)
    return TorchvisionNet(net, stages, feature_dim, head)


def _load(name: str, weights: str | None, num_classes: int, options: dict
          ) -> tuple[nn.Module, int]:
    """Build the network; returns it and how many classes its head has."""
    import torchvision

    get_model = torchvision.models.get_model
    try:
        if weights is None:
            return get_model(name, weights=None, num_classes=num_classes, **options), num_classes
        enum = torchvision.models.get_model_weights(name)
        try:
            w = enum.verify(str(weights))
        except (KeyError, ValueError) as err:
            raise UserError(f"torchvision model {name!r} has no weights {weights!r}",
                            key="teacher.weights",
                            fix=f"choose one of: {', '.join(enum.__members__)}, or null") from err
        try:
            return get_model(name, weights=w, **options), len(w.meta["categories"])
        except TypeError:  # a bad option, reported below, not a failed download
            raise
        except Exception as err:  # no internet, no file, corrupt download
            raise UserError(f"Could not load torchvision weights {w} ({err})",
                            key="teacher.weights",
                            fix="put the file in $TORCH_HOME/hub/checkpoints, or set it to null "
                                "for a randomly initialised model") from err
    except TypeError as err:  # an option the torchvision builder does not take
        raise UserError(f"torchvision model {name!r} rejected its options {options}: {err}",
                        key="arch", fix="remove the option") from err


def _find_head(net: nn.Module, classes: int) -> str:
    # the head is registered last; SqueezeNet's is a 1x1 conv rather than a Linear
    found = [n for n, m in net.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == classes)
             or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and m.out_channels == classes)]
    if not found:
        raise UserError(f"Cannot find the classification layer of {type(net).__name__}",
                        key="name", fix="choose another torchvision model")
    return found[-1]


def _adapt_first_conv(net: nn.Module, name: str, in_channels: int, pretrained: bool) -> None:
    path = next((n for n, m in net.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)
    if path is None:
        raise UserError(f"torchvision model {name!r} has no 3-channel input conv to adapt to "
                        f"{in_channels}-channel inputs", key="name",
                        fix="choose a convolutional model such as resnet18")
    old = net.get_submodule(path)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode)
    with torch.no_grad():
        w = old.weight
        if pretrained:
            new.weight.copy_(w.mean(1, keepdim=True).expand_as(new.weight) * (3 / in_channels))
        else:
            new.weight.copy_(w[:, torch.arange(in_channels) % 3])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    net.set_submodule(path, new)


def _derive_stages(net: nn.Module, name: str, head: str, in_channels: int,
                   input_size: tuple[int, ...]) -> tuple[str, ...]:
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        return tuple(f"layer{i}" for i in range(1, 5))
    body = next((b for b in _BODIES
                 if isinstance(getattr(net, b, None), nn.Module)
                 and len(list(getattr(net, b).children())) > 1), None)
    if body is not None:
        candidates = [f"{body}.{c}" for c, _ in getattr(net, body).named_children()]
    else:
        candidates = [c for c, _ in net.named_children() if c != head.split(".")[0]]
    candidates = [c for c in candidates if not isinstance(net.get_submodule(c), _GLUE)]
    was_training = net.training
    net.eval()  # no BatchNorm statistics update, no dropout
    try:
        with FeatureTaps(net, candidates) as taps, torch.no_grad():
            net(torch.zeros(1, in_channels, *input_size))
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"torchvision model {name!r} cannot run on inputs of shape "
                        f"{[in_channels, *input_size]} ({err})", key="name",
                        fix="choose a model that accepts this input size (e.g. resnet18), "
                            "or pass its size option (e.g. image_size for ViT)") from err
    finally:
        net.train(was_training)
    fired = [(c, taps.outputs[c]) for c in candidates
             if isinstance(taps.outputs.get(c), torch.Tensor)]
    # shape[-2] is the height for NCHW and the width for channels-last NHWC: both shrink at a
    # stage boundary. "Shrinks" means by a quarter or more, so unpadded convs (Inception's
    # 149 -> 147 px) do not count as a new stage.
    def shrinks(i: int) -> bool:
        out, nxt = fired[i][1], fired[i + 1][1]
        return out.ndim == nxt.ndim == 4 and 4 * nxt.shape[-2] <= 3 * out.shape[-2]

    return tuple(c for i, (c, _) in enumerate(fired) if i == len(fired) - 1 or shrinks(i))
