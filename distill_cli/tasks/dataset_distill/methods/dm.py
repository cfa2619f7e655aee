"""DM — Distribution Matching (Zhao & Bilen, WACV 2023), METHODS_FAMILIES.md C3.

    L = Σ_c ‖ mean_{x ∈ B_c} φ(A_ω_c(x)) − mean_{s ∈ S_c} φ(A_ω_c(s)) ‖²

φ = `net.embed` of a FRESH randomly initialised ConvNet every update (parameters frozen, train
mode), B_c the real class batch (features detached), S_c the class's synthetic images, A_ω_c one
Siamese DSA transformation drawn per class and applied to both sides. A linear-kernel MMD: no
gradient through the network, one SGD step on the images per update.

Source: VICO-UoE/DatasetCondensation@53f63a67 main_DM.py:139-192 — what we match: a new
`get_network` per iteration with `requires_grad = False` and `net.train()` (:139-142); per class
`DiffAugment(real, seed=s)` / `DiffAugment(syn, seed=s)` with one seed (:155-158); the loss
`torch.sum((mean(output_real, 0) − mean(output_syn, 0))**2)` summed over classes (:160-163);
BN networks forward all classes in one batch so the batch statistics mix classes (:165-187).
Ours differs only in where randomness comes from (seeded generators, see `Matching`): the
authors seed DSA from the clock and the network from the global RNG.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.nets import build_net
from distill_cli.tasks.dataset_distill.objective import SetObjective


def mean_gap(real: list[torch.Tensor], syn: list[torch.Tensor]) -> torch.Tensor:
    """`Σ_c ‖mean_rows real_c − mean_rows syn_c‖²` over per-class `[n_c, ...]` tensors (flattened
    per row), in float32 — the authors' `sum((mean(real, 0) − mean(syn, 0))**2)` per class, summed
    ("MSE_B" in DataDAM). Class batches may differ in size (a class with fewer real images)."""
    total = None
    for r, s in zip(real, syn):
        gap = (r.flatten(1).float().mean(0) - s.flatten(1).float().mean(0)).pow(2).sum()
        total = gap if total is None else total + gap
    return total


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def by_class(fn: Callable[[torch.Tensor], list[torch.Tensor]], parts: list[torch.Tensor],
             joint: bool) -> list[list[torch.Tensor]]:
    """`fn` (images → list of per-row outputs) per class: `[class][output]`. With `joint`, one
    forward over all classes concatenated (the authors' BN path, so batch statistics mix the
    classes), split back by class; otherwise one forward per class (equal for nets whose rows do
    not interact, e.g. instance norm, and peak memory stays one class batch)."""
    if not joint:
        return [fn(p) for p in parts]
    sizes = [len(p) for p in parts]
    outs = [o.split(sizes) for o in fn(torch.cat(parts))]
    return [[o[c] for o in outs] for c in range(len(parts))]


class Matching(SetObjective):
    """What DM and DataDAM share: the fresh frozen network of each update and the per-class
    Siamese-augmented real and synthetic batches.

    Randomness: the network is built from `derive_seed(<method>-net, seed, step)` and the DSA
    transformations from a generator seeded `derive_seed(<method>-dsa, seed, step)`, so an update
    is a pure function of (seed, step, set, batch) and resume is exact with no state carried
    across steps (nothing to checkpoint)."""

    method = "matching"

    def __init__(self, net=None, seed: int = 0, dsa_strategy: str = dsa.STRATEGY_DEFAULT):
        super().__init__()
        if net is None or not hasattr(net, "get"):
            raise UserError(f"loss={self.method} needs the matching network node, got {net!r}",
                            "loss.net", "Set loss.net=${task.net} (the method's YAML does)")
        self.net = dict(net)
        self.seed = int(seed)
        self.dsa_strategy = "" if dsa_strategy is None else str(dsa_strategy)
        dsa.families(self.dsa_strategy, key="loss.dsa_strategy")   # unknown names: UserError
        self.in_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None

    @staticmethod
    def _weight(name: str, value) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not ok or not math.isfinite(float(value)) or float(value) < 0:
            raise UserError(f"loss.{name}={value!r} must be a finite number >= 0",
                            f"loss.{name}", "Give a non-negative number")
        return float(value)

    def bind(self, student, teacher, data) -> None:
        self.in_shape = tuple(int(s) for s in data.input_shape)
        self.num_classes = int(data.num_classes)
        if len(self.in_shape) != 3:
            raise UserError(f"loss={self.method} matches image features, but the dataset's "
                            f"inputs have shape {self.in_shape}", "dataset",
                            "Use an image dataset (C, H, W): digits, mnist, cifar10, ...")
        # fail at start-up, not at step 0, on a net node the method cannot use
        self.check(self.fresh_net(0, torch.device("cpu")))

    def check(self, net: nn.Module) -> None:
        """Refuse a network the method cannot use (bind time)."""
        if not callable(getattr(net, "embed", None)):
            raise UserError(f"loss={self.method} needs a network with embed(x) (ConvNet), got "
                            f"{type(net).__name__}", "task.net", "Use task.net.arch=convnet")

    def fresh_net(self, step: int, device) -> nn.Module:
        net = build_net(self.net, self.in_shape, self.num_classes,
                        seed=derive_seed(f"{self.method}-net", self.seed, step)).to(device)
        net.train()   # the authors keep it in train mode (BN uses batch statistics)
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def class_pairs(self, student, batch, step: int) -> tuple[list, list]:
        """Per class c: (DSA(real_c), DSA(syn_c)) with one transformation drawn for the pair."""
        g = torch.Generator().manual_seed(derive_seed(f"{self.method}-dsa", self.seed, step))
        _, height, width = self.in_shape
        real, syn = [], []
        for c in range(student.num_classes):
            r = batch.x[batch.y == c]
            if len(r) == 0:   # the task's batches hold every class with training images
                raise RuntimeError(f"{self.method}: the real batch has no image of class {c}")
            s = student.class_images(c)
            params = dsa.sample(self.dsa_strategy, 1, g, height, width)
            real.append(dsa.apply(r, params).detach())
            syn.append(dsa.apply(s, params))
        return real, syn


class DM(Matching):
    """DM: `Σ_c ‖mean φ(A(real_c)) − mean φ(A(syn_c))‖²` (module docstring). Terms: `loss`."""

    method = "dm"

    def step_terms(self, student, teacher, batch, ctx):
        net = self.fresh_net(ctx.step, student.images.device)
        real, syn = self.class_pairs(student, batch, ctx.step)
        joint = has_batchnorm(net)
        with torch.no_grad():   # real features are constants (the authors' .detach())
            f_real = by_class(lambda x: [net.embed(x)], real, joint)
        f_syn = by_class(lambda x: [net.embed(x)], syn, joint)
        loss = mean_gap([f[0] for f in f_real], [f[0] for f in f_syn])
        return {"loss": loss}
