"""The shared base of feature-distillation objectives (FitNet, AT, RKD, CRD, OFA, DisWOT†).

A `FeatureObjective` is a `StepObjective`: it reads features of both models through forward
hooks (models/taps.py — no model rewrites), runs the frozen teacher without gradient and the
student with it, and calls its own `forward` with the features:

    forward(student_logits, teacher_logits, targets, ctx, *, s_feats, t_feats, index)

What `s_feats` / `t_feats` hold is the objective's `reads` (one list per model, same order):
  "stages"       the outputs of the PAIRED stages (`stage_pairs`; FitNet, AT, OFA): CNN maps
                 `[B, C, H, W]`, ViT/mixer tokens `[B, N, D]` (models with a `grid_size`) or
                 vectors `[B, D]` as the model produces them; 1-D conv maps `[B, C, L]` are
                 refused in `bind` (they would read as tokens);
  "penultimate"  [the classifier's input `[B, feature_dim]`] — RepDistiller's `feat[-1]`
                 (RKD, CRD), read by `taps.ClassifierInput`. Not the pool of the last stage:
                 on WRN / MobileNetV2 / ShuffleNetV2 RepDistiller's stages stop before the
                 bn-relu / 1x1 conv that feeds the pool;
  "prepool"      [the map that is pooled (`taps.prepool_path`), the classifier's input]
                 (DisWOT†: D_rel on the first, D_sem's FC gradient from the second).
`index` holds the samples' positions in the training split (CRD's memory bank). Tests call
`forward` directly with fixed tensors; `bind` builds the trainable heads from the shapes of one
dry forward.
"""
from __future__ import annotations

import torch
from torch import nn

from distill_cli.errors import UserError
from distill_cli.models.taps import ClassifierInput, FeatureTaps, prepool_path
from distill_cli.losses.base import StepContext, StepObjective


def pooled(feat: torch.Tensor) -> torch.Tensor:
    """`[B, D]` from a stage output: maps are averaged over space, tokens over the sequence."""
    if feat.dim() == 4:
        return feat.mean(dim=(2, 3))
    if feat.dim() == 3:
        return feat.mean(dim=1)
    return feat.flatten(1)


def stage_pairs(n_student: int, n_teacher: int, stages="all") -> list[tuple[int, int]]:
    """(student stage, teacher stage) index pairs. `stages`: "all", or a list of student stage
    indices (negative counts from the end). Each student stage is paired with the teacher stage
    at the same relative depth, so models with different stage counts still pair up, last with
    last."""
    if stages == "all":
        chosen = list(range(n_student))
    else:
        bad = [i for i in stages if not -n_student <= int(i) < n_student]
        if bad:
            raise UserError(f"loss.stages={list(stages)}: the student has {n_student} stages "
                            f"(indices {-n_student}..{n_student - 1})", "loss.stages",
                            "Use stage indices in that range, or stages=all")
        chosen = sorted({int(i) % n_student for i in stages})
    if n_student == 1:
        return [(0, n_teacher - 1)]
    return [(i, round(i * (n_teacher - 1) / (n_student - 1))) for i in chosen]


READS = ("stages", "penultimate", "prepool")


class Features:
    """One model's reads on every forward: the outputs of the modules at `paths`, then, with
    `penultimate`, the classifier's input. `values()` lists them in that order."""

    def __init__(self, model: nn.Module, paths: list[str], penultimate: bool, key: str):
        self.paths = list(paths)
        self.maps = FeatureTaps(model, self.paths, key=key)
        self.pen = ClassifierInput(model) if penultimate else None

    def values(self) -> list:
        return [self.maps[p] for p in self.paths] + ([self.pen.value] if self.pen else [])


class FeatureObjective(StepObjective):
    """Subclasses set `reads` (see the module docstring; "stages" with `stages`, see
    `stage_pairs`) and implement `build_heads` (optional) and
    `forward(..., s_feats, t_feats, index)`."""

    reads = "stages"

    def __init__(self, stages="all"):
        super().__init__()
        self.stages = stages if stages == "all" else list(stages)
        self._feats: tuple[Features, Features] | None = None
        self.pairs: list[tuple[int, int]] = []   # (student, teacher) stage pairs ("stages")

    def _paths(self, student: nn.Module, teacher) -> tuple[list[str], list[str]]:
        """The module paths tapped on each model (before the classifier's input, if read)."""
        if self.reads == "stages":
            self.pairs = stage_pairs(len(student.stages), len(teacher.stages), self.stages)
            return ([student.stages[i] for i, _ in self.pairs],
                    [teacher.stages[j] for _, j in self.pairs])
        if self.reads == "prepool":
            return [prepool_path(student)], [prepool_path(teacher)]
        return [], []

    def bind(self, student: nn.Module, teacher, data) -> None:
        if self.reads not in READS:
            raise ValueError(f"{type(self).__name__}.reads={self.reads!r} is not one of {READS}")
        s_paths, t_paths = self._paths(student, teacher)
        pen = self.reads != "stages"
        self._feats = (Features(student, s_paths, pen, "student"),
                       Features(teacher, t_paths, pen, "teacher"))
        x = next(iter(data.val.eval_batches(2))).x
        was_training = student.training
        student.eval()   # no BN statistics update from the dry run
        with torch.no_grad():
            s_feats, t_feats, s_logits, t_logits = self._forward_both(student, teacher, x)
        student.train(was_training)
        for model, feats, key in ((student, s_feats, "student"), (teacher, t_feats, "teacher")):
            if any(f.dim() == 3 for f in feats) and not hasattr(model, "grid_size"):
                # [B, C, L] maps of a 1-D conv net read like [B, N, D] tokens: refuse, not guess
                raise UserError(f"loss={type(self).__name__} reads stage features, but "
                                f"{key}={type(model).__name__} has 3-D stage outputs that are "
                                "not tokens on a grid (1-D feature maps [B, C, L]; a token "
                                "model declares `grid_size`)", key,
                                "Use a logit method (kd, dkd, ...) for 1-D signal models")
        self.build_heads([f.shape[1:] for f in s_feats], [f.shape[1:] for f in t_feats],
                         s_logits.shape[1], student, teacher)

    def build_heads(self, s_shapes, t_shapes, num_classes: int, student, teacher) -> None:
        """Create trainable modules from per-pair feature shapes (without the batch dim)."""

    def _forward_both(self, student, teacher, x):
        s_reads, t_reads = self._feats
        with torch.no_grad():
            t_logits = teacher(x).float()
            t_feats = [f.detach() for f in t_reads.values()]
        s_logits = student(x).float()
        return s_reads.values(), t_feats, s_logits, t_logits

    def step_terms(self, student, teacher, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self._forward_both(student, teacher, batch.x)
        return self(s_logits, t_logits, batch.y, ctx, s_feats=s_feats, t_feats=t_feats,
                    index=batch.index)
