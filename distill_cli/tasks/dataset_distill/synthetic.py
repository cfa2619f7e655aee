"""The student of dataset distillation: a small synthetic training set.

`images` holds IPC images per class in the dataset's NORMALISED space, class-ordered (class c at
rows c*ipc:(c+1)*ipc), as the authors' `image_syn` tensors; `labels` are the fixed hard labels. An
optional learnable step size (MTT's `syn_lr`) belongs to the set: the evaluation protocol trains
on the set with it. Everything is a parameter or buffer, so checkpoints and resume need nothing
special; the set's own optimizer is the run's `optimizer` group (`optimizer_groups`).
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.data.augment import normalize
from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed

INITS = ("real", "noise")


class SyntheticSet(nn.Module):
    def __init__(self, num_classes: int, ipc: int, image_shape: tuple[int, ...]):
        super().__init__()
        self.num_classes, self.ipc = int(num_classes), int(ipc)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.images = nn.Parameter(torch.zeros(self.num_classes * self.ipc, *self.image_shape))
        self.register_buffer("labels", torch.arange(self.num_classes).repeat_interleave(self.ipc))
        self.lr: nn.Parameter | None = None
        self.lr_lr: float | None = None   # the learning rate of `lr` in the optimizer

    def class_images(self, c: int) -> torch.Tensor:
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def enable_learnable_lr(self, init: float, lr: float) -> None:
        """A learnable step size (MTT's `syn_lr`, initialised to the experts' lr), optimised in
        its own optimizer group at learning rate `lr` (MTT's `lr_lr`)."""
        self.lr = nn.Parameter(torch.tensor(float(init), device=self.images.device))
        self.lr_lr = float(lr)

    def optimizer_groups(self) -> list[dict]:
        """The optimizer's parameter groups: the images at the run's lr; a learnable step size
        at its own."""
        groups: list[dict] = [{"params": [self.images]}]
        if self.lr is not None:
            groups.append({"params": [self.lr], "lr": self.lr_lr})
        return groups

    def learned_lr(self) -> float | None:
        return None if self.lr is None else float(self.lr.detach())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels


def class_indices(targets: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Positions of each class in a split (CPU int64), in split order."""
    targets = targets.cpu()
    return [torch.nonzero(targets == c).flatten() for c in range(num_classes)]


def init_set(split, num_classes: int, ipc: int, init: str, seed: int) -> SyntheticSet:
    """A set initialised from `ipc` random real training images per class (`real`, the
    authors' `--init real`) or N(0, 1) noise in normalised space (`noise`), from `seed`."""
    if init not in INITS:
        raise UserError(f"student.init={init!r} is not an initialisation", "student.init",
                        f"Use one of: {', '.join(INITS)}")
    x = getattr(split, "x", None)
    if x is None:
        raise UserError("Dataset distillation needs a dataset held in memory (digits, "
                        "fashion_mnist, mnist, cifar10, ...); this one streams from disk",
                        "dataset", "Pick an in-memory dataset")
    shape = tuple(x.shape[1:])
    pools = class_indices(split.targets, num_classes)
    short = [(c, len(p)) for c, p in enumerate(pools) if len(p) < ipc]
    if short:
        c, n = short[0]
        raise UserError(f"student.ipc={ipc} images per class, but class {c} has only {n} "
                        "training images", "student.ipc",
                        f"Use student.ipc <= {min(len(p) for p in pools)} (or more training data: "
                        "dataset.limit_train)")
    synthetic = SyntheticSet(num_classes, ipc, shape).to(x.device)
    g = torch.Generator().manual_seed(derive_seed("dd-init", seed))
    with torch.no_grad():
        if init == "noise":
            synthetic.images.copy_(torch.randn(synthetic.images.shape, generator=g))
        else:
            picks = torch.cat([p[torch.randperm(len(p), generator=g)[:ipc]] for p in pools])
            synthetic.images.copy_(normalize(x[picks.to(x.device)], split._mean, split._std))
    return synthetic
