"""SRe2L's Recover step (Yin, Xing, Shen, NeurIPS 2023) and CDA's crop curriculum (Yin & Shen,
TMLR 2024): synthesise the set from a frozen classifier's BatchNorm statistics, no real data.

    x_aug = roll(flip(RandomResizedCrop(x, scale=(s_min(k), 1))), (o1, o2)),  o ~ U{0..jitter}
    L = CE(f(x_aug), y) + r_bn Σ_l s_l (‖μ_l(x_aug) − μ_l^BN‖₂ + ‖σ²_l(x_aug) − σ²_l^BN‖₂)
        + tv_l2 TV₂(x_aug) + l2_scale mean_i ‖x_aug,i‖₂

μ_l, σ²_l: batch mean and biased variance over (N, H, W) of the INPUT of the teacher's l-th
BatchNorm2d (in `modules()` order); μ^BN, σ²^BN its running statistics; s_1 = first_bn_multiplier
(10), s_l = 1 after; plain (not squared) L2 norms. CDA: s_min(k) for k < milestone·K follows
step (1.0), linear (lo + (1 − lo)(1 − k/(mK))) or cosine (lo + (1 − lo)(1 + cos(π k/(mK)))/2),
then lo = 0.08 (METHODS_FAMILIES C6, C7).

Source: VILA-Lab/SRe2L@8d00cba SRe2L/recover/data_synthesis.py:20-116 (augmentation, loss, Adam
β=(0.5, 0.9), cosine lr, clip after each step), recover/utils.py:57-117 (`clip`, `BNFeatureHook`,
`get_image_prior_losses`), *small_dataset/recover_cifar.py:45-146 (CIFAR: no crop/flip, jitter 4);
CDA/recover_cda_in1k.py:48-80 (the min-crop curriculum), recover_cda_tiny.py (64 px: crop+flip,
jitter 4).

What we match: ONE crop, one flip flag and one jitter offset per forward batch (torchvision
transforms on a 4-D tensor), torchvision's RandomResizedCrop parameter draw (10 tries of area
scale × log-uniform ratio in [3/4, 4/3], then a centre crop) and bilinear resize; the BN hook's
statistics; the first-BN multiplier by `modules()` order; the clip of x to the valid normalised
pixel range after every step (`after_step`). The authors optimise each IPC index's batch of one
image per class separately (its own BN batch statistics, crop and Adam state):
`group: per_ipc` does the same (one forward per IPC index, their losses SUMMED, so each image's
gradient is exactly its own batch's; Adam is element-wise, so one optimizer over all of them is
the authors' separate optimizers). `group: whole` matches the BN statistics of the whole set in
one forward instead. Every draw comes from a generator seeded by derive_seed("sre2l", seed,
step): a step is a pure function of (seed, step), resume is exact, no state crosses steps.
"""
from __future__ import annotations

import contextlib
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill.objective import SetObjective
from distill_cli.tasks.dataset_distill.synthetic import SyntheticSet

CURRICULA = ("none", "step", "linear", "cosine")
GROUPS = ("per_ipc", "whole")
RATIO = (3.0 / 4.0, 4.0 / 3.0)   # torchvision RandomResizedCrop's default aspect-ratio range


def min_scale_at(step: int, total: int, low: float, high: float, curriculum: str,
                 milestone: float) -> float:
    """CDA's lower crop scale at step `step` of `total` (recover_cda_in1k.py:51-66): before
    milestone·total it rises from `low` to `high` by the mode ("easy to hard"), then `low`.
    curriculum "none" = SRe2L's fixed `low`."""
    end = milestone * total
    if curriculum == "none" or not step < end:
        return low
    if curriculum == "step":
        return high
    if curriculum == "linear":
        return low + (high - low) * (1.0 - step / end)
    return low + (high - low) * (1.0 + math.cos(math.pi * step / end)) / 2.0


def crop_box(g: torch.Generator, height: int, width: int, scale: tuple[float, float]
             ) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params drawn from `g`."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=g).item())
        w = round(math.sqrt(target * aspect))   # Python's round, as torchvision
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    ratio = width / height   # fallback: the centre crop of the clamped ratio
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(x: torch.Tensor, g: torch.Generator, *, crop: bool, flip: bool, jitter: int,
            scale: tuple[float, float]) -> torch.Tensor:
    """One crop (resized back), one flip flag and one roll for the whole batch, in the authors'
    order, differentiable in x. Draw order from `g`: crop box, flip, the two offsets."""
    height, width = x.shape[-2:]
    if crop:
        top, left, h, w = crop_box(g, height, width, scale)
        x = x[:, :, top:top + h, left:left + w]
        if (h, w) != (height, width):
            # the crop is never larger than the image, so this only upsamples, where
            # torchvision's antialias=True is plain bilinear (align_corners=False)
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if flip and bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(3)
    if jitter > 0:
        # random.randint(0, jitter) on each axis: inclusive, non-negative (the authors)
        off = torch.randint(0, jitter + 1, (2,), generator=g)
        x = torch.roll(x, shifts=(int(off[0]), int(off[1])), dims=(2, 3))
    return x


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers with running statistics, in `modules()` order (the authors')."""
    return [m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]


@contextlib.contextmanager
def bn_distances(layers: list[nn.BatchNorm2d]):
    """Forward hooks that record, per layer index, ‖μ − μ^BN‖₂ + ‖σ² − σ²^BN‖₂ of the layer's
    input batch (mean / biased variance over N, H, W). Registered only for one step's forward,
    so the teacher's other uses (the relabel evaluation) run without them."""
    found: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, inputs, output):
            x = inputs[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
            found[i] = (torch.linalg.vector_norm(module.running_mean.float() - mean)
                        + torch.linalg.vector_norm(module.running_var.float() - var))
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """The authors' `loss_var_l2`: L2 norms (over the whole batch) of the four neighbour
    differences (right, down, two diagonals), summed."""
    return (torch.linalg.vector_norm(x[:, :, :, :-1] - x[:, :, :, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.linalg.vector_norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def _number(value, key: str, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low <= float(value) and (high is None or float(value) <= high)):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"loss.{key}={value!r} must be a number {bound}", f"loss.{key}",
                        "See distill_cli/conf/loss/sre2l.yaml for the authors' values")
    return float(value)


class Recover(SetObjective):
    """SRe2L / CDA recover: the set is optimised so the frozen teacher classifies its
    augmented images as their labels with BatchNorm input statistics like its training data's."""

    needs_teacher = True
    # The loss reads the teacher's BatchNorm layers: the frozen teacher must come back UNFOLDED
    # (teachers/resolve.py folds BN into the convs of every frozen teacher; it skips that for
    # an objective with this flag). Folded, bind() finds no BatchNorm and refuses the teacher.
    keeps_teacher_batchnorm = True

    # The Relabel step's settings (the evaluation protocol's soft labels; the lead's
    # protocol.py reads task.eval.relabel). VILA-Lab/SRe2L@8d00cba SRe2L/validate/train_FKD.sh
    # (-T 20, --cos, batch 1024) and train_FKD.py:157-166 (AdamW lr 1e-3 wd 0.01, cosine per
    # epoch to 0), :216 and :248-252 (KLDivLoss batchmean of log_softmax(z_S/T) against
    # softmax(z_T/T), the T² factor commented out); the code's -T default is 3.
    # *small_dataset/relabel_cifar.py:104-108 (CIFAR-100): the same optimizer, CosineAnnealingLR
    # over the epochs, temperature hard-coded 30, batch 128, RandomCrop(32, pad 4) + flip.
    RELABEL: ClassVar[dict] = {"temperature": 20.0, "t_squared": False, "reduction": "batchmean",
               "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "schedule": "cosine",
               "epochs": 300, "batch_size": 1024, "cifar_temperature": 30.0}

    def __init__(self, seed: int = 0, r_bn: float = 0.01, first_bn_multiplier: float = 10.0,
                 tv_l2: float = 0.0, l2_scale: float = 0.0, crop: bool = False,
                 flip: bool = False, jitter: int = 4, min_scale: float = 0.08,
                 max_scale: float = 1.0, curriculum: str = "none", milestone: float = 0.0,
                 clip: bool = True, group: str = "per_ipc"):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"loss.seed={seed!r} must be an integer", "loss.seed",
                            "Leave it as ${seed}")
        self.seed = seed
        self.r_bn = _number(r_bn, "r_bn")
        self.first_bn_multiplier = _number(first_bn_multiplier, "first_bn_multiplier")
        self.tv_l2 = _number(tv_l2, "tv_l2")
        self.l2_scale = _number(l2_scale, "l2_scale")
        for key, value in (("crop", crop), ("flip", flip), ("clip", clip)):
            if not isinstance(value, bool):
                raise UserError(f"loss.{key}={value!r} must be true or false", f"loss.{key}",
                                f"Use loss.{key}=true or loss.{key}=false")
        self.crop, self.flip, self.clip = crop, flip, clip
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise UserError(f"loss.jitter={jitter!r} must be a whole number >= 0 (pixels)",
                            "loss.jitter", "Use e.g. 4 (the authors' CIFAR / Tiny-ImageNet "
                            "value), 0 = no shift")
        self.jitter = jitter
        self.max_scale = _number(max_scale, "max_scale", 0.0, 1.0)
        self.min_scale = _number(min_scale, "min_scale", 0.0, self.max_scale)
        if self.min_scale <= 0.0:
            raise UserError(f"loss.min_scale={min_scale!r} must be > 0 (a crop's area share)",
                            "loss.min_scale", "Use 0.08 (torchvision's and the authors')")
        if curriculum not in CURRICULA:
            raise UserError(f"loss.curriculum={curriculum!r} is not a curriculum",
                            "loss.curriculum", f"Use one of: {', '.join(CURRICULA)}")
        self.curriculum = curriculum
        self.milestone = _number(milestone, "milestone", 0.0, 1.0)
        if curriculum != "none" and not crop:
            raise UserError(f"loss.curriculum={curriculum} schedules the crop's scale, but "
                            "loss.crop=false", "loss.crop",
                            "Set loss.crop=true, or loss.curriculum=none")
        if group not in GROUPS:
            raise UserError(f"loss.group={group!r} is not a grouping", "loss.group",
                            f"Use one of: {', '.join(GROUPS)} (per_ipc = the authors)")
        self.group = group
        # outside the module tree (never parameters, never in state_dict): the set whose
        # images `after_step` clips, the clip bounds, the teacher's BN layers
        self._bound: list = []
        self._layers: list[nn.BatchNorm2d] = []
        self._low = self._high = None

    # ------------------------------------------------------------------ binding
    def bind(self, student, teacher, data) -> None:
        if not isinstance(student, SyntheticSet):
            raise UserError(f"loss={type(self).__name__} distils a synthetic set, not a "
                            f"{type(student).__name__}", "student",
                            "Use task=dataset_distill student=synthetic")
        if not isinstance(teacher, nn.Module):
            raise UserError("SRe2L / CDA recover the set from ONE frozen classifier's "
                            f"BatchNorm statistics; got {type(teacher).__name__}", "teacher",
                            "Give one teacher with BatchNorm (e.g. teacher=resnet8, or the "
                            "store's teacher=cnn), not teacher=none or a `teachers` pool")
        self._layers = bn_layers(teacher)
        if not self._layers:
            raise UserError(f"the teacher ({type(teacher).__name__}) has no BatchNorm2d layer "
                            "with running statistics, which SRe2L's loss matches", "teacher",
                            "Use a teacher with BatchNorm: teacher=resnet8 (or any zoo resnet "
                            "/ wrn / cnn)")
        shape = tuple(data.input_shape)
        mean, std = getattr(data.train, "mean", None), getattr(data.train, "std", None)
        if len(shape) != 3 or mean is None or std is None or len(mean) != shape[0]:
            raise UserError(f"SRe2L crops, flips and shifts 2-D images with per-channel "
                            f"mean/std; this dataset's samples are {shape}", "dataset",
                            "Use an image dataset (digits, mnist, fashion_mnist, cifar10, ...)")
        if self.jitter >= min(shape[1:]):
            raise UserError(f"loss.jitter={self.jitter} shifts by up to the whole "
                            f"{shape[1]}x{shape[2]} image (a roll wraps around)", "loss.jitter",
                            f"Use loss.jitter < {min(shape[1:])} (the authors: 4 of 32 px; "
                            "digits' 8 px: 1)")
        device = student.images.device
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # the normalised images of pixels in [0, 1] (the authors' `clip`)
        self._low, self._high = (0.0 - m) / s, (1.0 - m) / s
        self._bound = [student]
        # the evaluation's soft labels (the lead's protocol): a plain attribute, so the
        # teacher is neither a submodule of the set nor in its state_dict
        object.__setattr__(student, "relabel_teacher", teacher)

    # ------------------------------------------------------------------ the step
    def scale_at(self, ctx) -> tuple[float, float]:
        return (min_scale_at(ctx.step, ctx.total_steps, self.min_scale, self.max_scale,
                             self.curriculum, self.milestone), self.max_scale)

    def groups(self, student) -> list[torch.Tensor]:
        """Rows of each forward batch: per_ipc = one image per class for each IPC index
        (the authors' batches), whole = the set."""
        if self.group == "whole":
            return [torch.arange(len(student.labels), device=student.images.device)]
        base = torch.arange(student.num_classes, device=student.images.device) * student.ipc
        return [base + i for i in range(student.ipc)]

    def step_terms(self, student, teacher, batch, ctx) -> dict[str, torch.Tensor]:
        if not self._layers:
            raise RuntimeError("Recover.bind(student, teacher, data) was not called")
        g = torch.Generator().manual_seed(derive_seed("sre2l", self.seed, ctx.step))
        scale = self.scale_at(ctx)
        images, labels = student()
        weights = [self.first_bn_multiplier] + [1.0] * (len(self._layers) - 1)
        loss = ces = bns = 0.0
        rows = self.groups(student)
        for idx in rows:
            x = augment(images.index_select(0, idx), g, crop=self.crop, flip=self.flip,
                        jitter=self.jitter, scale=scale)
            with bn_distances(self._layers) as found:
                logits = teacher(x).float()
            ce = F.cross_entropy(logits, labels.index_select(0, idx))
            bn = sum((weights[i] * r for i, r in sorted(found.items())),
                     torch.zeros((), device=logits.device))
            term = ce + self.r_bn * bn
            if self.tv_l2:
                term = term + self.tv_l2 * tv_l2(x.float())
            if self.l2_scale:
                term = term + self.l2_scale * torch.linalg.vector_norm(
                    x.float().flatten(1), dim=1).mean()
            # summed: each IPC batch's images get exactly their own batch's gradient
            loss, ces, bns = loss + term, ces + ce.detach(), bns + bn.detach()
        n = len(rows)
        terms = {"loss": loss, "ce": ces / n, "bn": bns / n}
        if self.crop:   # the crop's lower scale (CDA's curriculum) is logged when it is used
            terms["min_scale"] = torch.tensor(scale[0], device=images.device)
        return terms

    def after_step(self, terms, ctx) -> None:
        """Clip the set to the valid normalised pixel range (the authors' `clip` after each
        optimizer step)."""
        if self.clip and self._bound:
            with torch.no_grad():
                images = self._bound[0].images
                images.copy_(torch.maximum(torch.minimum(images, self._high), self._low))

    def extra_repr(self) -> str:
        return (f"r_bn={self.r_bn}, first_bn_multiplier={self.first_bn_multiplier}, "
                f"crop={self.crop}, flip={self.flip}, jitter={self.jitter}, "
                f"scale=({self.min_scale}, {self.max_scale}), curriculum={self.curriculum}, "
                f"milestone={self.milestone}, group={self.group}")
