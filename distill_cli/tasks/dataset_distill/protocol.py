"""The field's evaluation protocol: fresh networks trained from scratch on the synthetic set,
then tested on real data (DatasetCondensation `evaluate_synset`, utils.py:337-361; METHODS_FAMILIES
C0), the same for every method.

Each network: `arch` (ConvNet-3 by default) initialised from `derive_seed("dd-eval", seed, i)`,
SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch 256, `epochs` epochs with the lr ×0.1 once
at epoch epochs//2 (the authors decay when `ep == Epoch // 2`), cross-entropy on hard labels, DSA
per-image augmentation of the synthetic images (`dsa_strategy`, "" = none). MTT evaluates with
its learned step size (`use_learned_lr`). With a relabel teacher (SRe2L / CDA) the networks learn
the teacher's soft labels of each augmented batch instead (KL at temperature T, batchmean, no
T² — the authors' train_FKD.py — with AdamW and a cosine schedule, the authors' FKD settings).

Every draw (data order, augmentation) comes from generators seeded by (seed, network, epoch), so
an evaluation is a pure function of the set and the seed.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.data.distilled import content_hash
from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed


@dataclass(frozen=True)
class Protocol:
    net: dict                     # the evaluation network (a zoo node: arch + options)
    models: int = 5               # networks trained per test evaluation (mean ± std)
    val_models: int = 1           # ... per validation evaluation (selects `best`)
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    use_learned_lr: bool = True
    relabel: dict = field(default_factory=dict)   # the soft-label settings (SRe2L / CDA)

    @classmethod
    def from_node(cls, node, net) -> "Protocol":
        values = {k: node[k] for k in node if k in cls.__dataclass_fields__ and k != "net"}
        for key in ("models", "val_models", "epochs", "batch_size"):
            value = values.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"task.eval.{key}={value!r} must be a positive integer",
                                f"task.eval.{key}", "Give a whole number >= 1")
        return cls(net=dict(net), **{k: (dict(v) if k == "relabel" else v)
                                     for k, v in values.items()})


class Evaluator:
    """Trains (and caches) the protocol's networks for a set; the cache lets the validation of
    the last epoch and the test of the last weights share their networks."""

    def __init__(self, protocol: Protocol, in_shape, num_classes: int, seed: int,
                 keep_sets: int = 2):
        self.protocol, self.in_shape, self.num_classes = protocol, tuple(in_shape), num_classes
        self.seed = int(seed)
        self._cache: OrderedDict[str, dict[int, nn.Module]] = OrderedDict()
        self._keep = keep_sets

    def networks(self, synthetic, count: int, teacher: nn.Module | None = None
                 ) -> list[nn.Module]:
        p = self.protocol
        lr = synthetic.learned_lr() if p.use_learned_lr else None
        # the same content hash that identifies a saved set (data/distilled.py)
        digest = content_hash({"images": synthetic.images.detach().float().cpu(),
                               "labels": synthetic.labels.cpu(), "lr": lr})
        nets = self._cache.setdefault(digest, {})
        self._cache.move_to_end(digest)
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        images = synthetic.images.detach().clone()
        labels = synthetic.labels.clone()
        for i in range(count):
            if i not in nets:
                nets[i] = self.train_one(images, labels, i, lr, teacher)
        return [nets[i] for i in range(count)]

    def train_one(self, images: torch.Tensor, labels: torch.Tensor, index: int,
                  lr: float | None, teacher: nn.Module | None) -> nn.Module:
        from distill_cli.tasks.dataset_distill import dsa
        from distill_cli.tasks.dataset_distill.nets import build_net

        p = self.protocol
        net = build_net(p.net, self.in_shape, self.num_classes,
                        derive_seed("dd-eval", self.seed, index)).to(images.device)
        net.train()
        relabel = teacher is not None
        if relabel:
            r = p.relabel
            optimizer = torch.optim.AdamW(net.parameters(), lr=float(r.get("lr", 1e-3)),
                                          weight_decay=float(r.get("weight_decay", 0.01)))
            temperature = float(r.get("temperature", 20.0))
        else:
            base = float(lr) if lr is not None else p.lr
            optimizer = torch.optim.SGD(net.parameters(), lr=base, momentum=p.momentum,
                                        weight_decay=p.weight_decay)
        n = len(images)
        steps_per_epoch = math.ceil(n / p.batch_size)
        total = p.epochs * steps_per_epoch
        step = 0
        for epoch in range(p.epochs):
            if relabel:   # cosine per step from lr to 0 (the FKD schedule)
                for g in optimizer.param_groups:
                    g["lr"] = float(p.relabel.get("lr", 1e-3)) * 0.5 * (
                        1 + math.cos(math.pi * step / total))
            elif epoch == p.epochs // 2:   # the authors' one decay (ep == Epoch // 2)
                for g in optimizer.param_groups:
                    g["lr"] *= 0.1
            gen = torch.Generator().manual_seed(derive_seed("dd-eval-epoch", self.seed, index,
                                                            epoch))
            order = torch.randperm(n, generator=gen).to(images.device)
            for start in range(0, n, p.batch_size):
                idx = order[start:start + p.batch_size]
                x = images[idx]
                if p.dsa_strategy and p.dsa_strategy != "none":
                    x = dsa.augment(x, p.dsa_strategy, gen)
                out = net(x)
                if relabel:
                    with torch.no_grad():
                        soft = teacher(x).float()
                    loss = F.kl_div(F.log_softmax(out / temperature, 1),
                                    F.softmax(soft / temperature, 1), reduction="batchmean")
                else:
                    loss = F.cross_entropy(out, labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        net.eval()
        return net
