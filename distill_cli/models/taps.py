"""Read intermediate features of any model through forward hooks, without rewriting it.

    with FeatureTaps(model, model.stages) as taps:
        logits = model(x)
        feats = [taps.outputs[p] for p in model.stages]   # e.g. [B, C_i, H_i, W_i] each

Outputs keep their autograd graph (feature-distillation losses back-propagate through them)
and are overwritten on every forward; `clear()` drops them to free memory early.
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Iterable

from torch import nn

from distill_cli.errors import UserError


class FeatureTaps:
    """Forward hooks on the modules at dotted `paths` (as in `model.named_modules()`).

    `outputs[path]` holds what that module returned on the latest forward (a Tensor for every
    zoo stage). Use as a context manager, or keep it and call `close()` to remove the hooks.
    `key` is the config key named in the error raised for an unknown path.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, key: str | None = None):
        self.paths = tuple(dict.fromkeys(paths))  # de-duplicated, order kept
        self.outputs: dict[str, Any] = {}
        self._handles = []
        # Resolve every path before hooking any, so a bad path leaves the model untouched.
        modules = [(p, _resolve(model, p, key)) for p in self.paths]
        for path, module in modules:
            self._handles.append(module.register_forward_hook(partial(self._store, path)))

    def _store(self, path: str, module: nn.Module, args: tuple, output: Any) -> None:
        self.outputs[path] = output

    def __getitem__(self, path: str) -> Any:
        return self.outputs[path]

    def clear(self) -> None:
        self.outputs.clear()

    def close(self) -> None:
        """Remove the hooks (idempotent); the model runs exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve(model: nn.Module, path: str, key: str | None) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    stages = getattr(model, "stages", ())
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(path, names, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise UserError(
        f"The {type(model).__name__} model has no module {path!r} to tap", key=key,
        fix=(f"{hint}Its declared stages are: {', '.join(stages) or '(none)'}; any dotted name "
             f"from `model.named_modules()` works too (e.g. {names[0] if names else 'layer1'!r})"))


def prepool_path(model: nn.Module) -> str:
    """The module whose output is the final feature map, the one globally pooled into the
    classifier's input: the model's `prepool` when it declares one (WRN's final bn-relu,
    MobileNetV2's / ShuffleNetV2's conv2 block, which RepDistiller's stages stop before), else
    its last stage. DisWOT's relation term (search score and DisWOT† loss) reads this map."""
    return getattr(model, "prepool", None) or model.stages[-1]


class ClassifierInput:
    """The pooled penultimate feature `[B, feature_dim]`: the INPUT of `model.classifier`, read
    by a forward pre-hook (RepDistiller's `feat[-1]`: what RKD, CRD and DisWOT†'s semantic term
    read, losses/features.py `reads`). It is not always the
    pool of the last stage: RepDistiller's stages (`model.stages`) stop before WRN's final bn-relu
    and before MobileNetV2's / ShuffleNetV2's conv2, which feed the pool.

        with ClassifierInput(model) as pen:
            logits = model(x)
            f = pen.value            # [B, model.feature_dim], with its autograd graph
    """

    def __init__(self, model: nn.Module):
        self.value = None
        self._handle = model.get_submodule(model.classifier).register_forward_pre_hook(
            self._store)

    def _store(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ClassifierInput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
