"""The networks dataset-distillation methods match with, built reproducibly from a seed.

* `build_net(node, in_shape, num_classes, seed)`: a zoo architecture (`{arch: convnet, width: 128,
  ...}`, the task's `net` node) with its parameters drawn from `seed` alone. The authors seed
  the GLOBAL RNG from the clock before every network (DatasetCondensation utils.py:125); we fork
  the CPU RNG instead, so building a network neither depends on nor disturbs anything else
  (resume stays bit-exact, the objective's other draws are unaffected).
* `flat_params` / `unflatten` / `functional_forward`: the parameters as ONE flat vector and a
  forward pass with any such vector (MTT's unrolled student, whose parameters are non-leaf
  tensors; the authors use a ReparamModule for the same purpose). Order = `named_parameters()`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distill_cli.errors import UserError


def _plain(node: Any) -> dict:
    """A plain dict from a dict / DictConfig node (interpolations resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(node, Mapping):
        raise TypeError(f"a network node must be a mapping, got {type(node).__name__}")
    return dict(node)


def build_net(node: Any, in_shape: Sequence[int], num_classes: int, seed: int,
              key: str = "task.net") -> nn.Module:
    """The zoo network `node['arch']` (other entries: its options) for inputs `in_shape` =
    (C, H, W) and `num_classes` outputs, initialised from `seed` without touching the global RNG.
    Built on the CPU (move it yourself). User errors name `key` + the option (`task.net.depth`)."""
    from distill_cli.models import create  # imports the zoo (registers `convnet`)

    options = _plain(node)
    # A zoo node copied from conf/student carries the target; the arch name is what matters.
    options.pop("_target_", None)
    arch = options.pop("arch", None)
    if not arch:
        raise UserError(f"The network node `{key}` has no `arch`", key=f"{key}.arch",
                        fix="name a zoo architecture, e.g. arch: convnet")
    in_shape = tuple(int(s) for s in in_shape)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) % (1 << 63))
            return create(arch, int(num_classes), in_shape[0], in_shape[1:], **options)
    except UserError as err:
        # The zoo names its own option (`depth`, `arch`); say where it sits in this config.
        sub = err.key or "arch"
        raise UserError(err.what, key=f"{key}.{sub.split('.')[-1]}", fix=err.fix) from None


def flat_params(net: nn.Module) -> torch.Tensor:
    """All parameters, flattened and concatenated in `named_parameters()` order (a copy that
    keeps the autograd graph: detach it for a starting point)."""
    return torch.cat([p.reshape(-1) for p in net.parameters()])


def unflatten(net: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """`flat` split back into `net`'s named parameters (views of `flat`: gradients flow)."""
    names, shapes = zip(*[(n, p.shape) for n, p in net.named_parameters()])
    sizes = [s.numel() for s in shapes]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"a flat vector of {sum(sizes)} parameters is needed for "
                         f"{type(net).__name__}, got shape {tuple(flat.shape)}")
    return {n: chunk.view(shape)
            for n, chunk, shape in zip(names, torch.split(flat, sizes), shapes)}


def load_flat_(net: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector (e.g. an expert's snapshot) into `net`'s parameters, in place."""
    with torch.no_grad():
        for p, value in zip(net.parameters(), unflatten(net, flat.detach()).values()):
            p.copy_(value)
    return net


def functional_forward(net: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`net(x)` computed with the parameters in `flat` instead of its own (differentiable in
    `flat` and `x`). Buffers are the module's own (none for instance norm; batch norm in train
    mode updates its running statistics, as the authors' ReparamModule does)."""
    tensors: dict[str, torch.Tensor] = dict(net.named_buffers())
    tensors.update(unflatten(net, flat))
    return torch.func.functional_call(net, tensors, (x,))
