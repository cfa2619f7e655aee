"""The multi-teacher pool (`teachers: [...]`, read by a `PoolObjective`):
DistillNearest / DistillWeighted-inspired — METHODS.md [abstract]; the score is OUR design.

Each entry is resolved like the `teacher` node (a checkpoint, or trained once by the teacher
store from its arch + seed + train). Then every teacher is put in THIS dataset's class space:

* same class count: its own head, as is;
* another class count (a source teacher trained on another task, checkpoint only): its pooled
  penultimate features with a nearest-class-mean head fitted on the training split (`NCMHead`).

Task-similarity score (computed once, before training, on the TRAINING split, eval mode, no
augmentation): the accuracy (fraction in [0, 1]) of exactly those class-space predictions — the
predictions the student will be distilled from. For an other-task teacher that is the accuracy of
a nearest-class-mean probe on its features (a linear-probe-like measure of how well its
representation separates the target classes). Scores are fitted and measured on the same split,
so they rank teachers by how well they FIT the target data, not by held-out accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_cli import keys
from distill_cli.config.build import TEACHER_SOURCE_KEYS
from distill_cli.config.paths import CONF_DIR
from distill_cli.tasks.classification.evaluate import predict
from distill_cli.errors import UserError
from distill_cli.teachers.build import StoreAccess
from distill_cli.teachers.resolve import resolve_teacher


class NCMHead(nn.Module):
    """A frozen backbone's pooled features → target-class logits of a nearest-class-mean head:
    `logits_c = −‖f − μ_c‖² / (2σ²)`, the posterior (up to a constant) of equal-prior Gaussian
    classes with one shared isotropic variance; μ_c and σ² are maximum-likelihood fits on the
    training split (σ² = mean squared deviation of the features from their class mean)."""

    def __init__(self, backbone: nn.Module, means: torch.Tensor, sigma2: float):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("means", means.float())
        self.scale = 0.5 / max(float(sigma2), 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).float()
        d2 = (f * f).sum(1, keepdim=True) - 2 * f @ self.means.T \
            + (self.means * self.means).sum(1)
        return -self.scale * d2


def features_only(model: nn.Module) -> nn.Module:
    """The model with its final linear layer (`model.classifier`) replaced by the identity, so it
    returns the pooled penultimate features `[B, feature_dim]`."""
    parent, _, name = model.classifier.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
    return model


def fit_ncm(model: nn.Module, data, batch_size: int, device, precision) -> NCMHead:
    backbone = features_only(model)
    feats, y = predict(backbone, data.train, batch_size, device, precision)
    feats, y = feats.double(), y.to(feats.device)
    counts = torch.bincount(y, minlength=data.num_classes).double()
    means = torch.zeros(data.num_classes, feats.shape[1], dtype=torch.float64,
                        device=feats.device).index_add_(0, y, feats) / counts.clamp(min=1)[:, None]
    sigma2 = float(((feats - means[y]) ** 2).mean())
    return NCMHead(backbone, means, sigma2).eval()


def entry_node(teacher: DictConfig, entry, i: int) -> DictConfig:
    """The teacher node of entry i: the zoo's defaults for its arch, the `teacher` node's source
    settings (seed, train, outputs), then the entry."""
    if not isinstance(entry, DictConfig) or not entry.get("arch"):
        raise UserError(f"teachers[{i}] must be a mapping with at least `arch`, got {entry!r}",
                        f"teachers[{i}]", "Write entries like {arch: resnet8, checkpoint: "
                        "<run>/checkpoints/best.pt} or {arch: resnet8, seed: 1}")
    source = {k: v for k, v in OmegaConf.to_container(teacher, resolve=True).items()
              if k in TEACHER_SOURCE_KEYS}
    # the zoo's defaults for the arch first, so `{arch: cnn}` is the same teacher (and the same
    # teacher-store entry) as `teacher=cnn`
    zoo = Path(CONF_DIR) / "student" / f"{entry.arch}.yaml"
    defaults = OmegaConf.load(zoo) if zoo.is_file() else {}
    node = OmegaConf.merge(defaults, {**source, "checkpoint": None,
                                      "_target_": "distill_cli.models.create"}, entry)
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


def resolve_pool(teacher: DictConfig, entries, data, device, reporter, access: StoreAccess,
                 eval_batch_size: int, precision: str
                 ) -> tuple[list[tuple[DictConfig, nn.Module, dict]], list[float], dict]:
    """(pool, scores, summary fields) of the `teachers` entries (`teacher`: the `teacher` node,
    whose source settings they share); the pool holds one (entry node, teacher in the dataset's
    class space, its `teacher/*` info) per entry."""
    bs = eval_batch_size
    pool, scores, sources = [], [], []
    for i, entry in enumerate(entries):
        node = entry_node(teacher, entry, i)
        try:
            model, info = resolve_teacher(node, data, device, reporter, access, any_classes=True)
        except UserError as err:   # name the entry, not the single-teacher key
            raise UserError(err.what, (err.key or "teacher").replace("teacher", f"teachers[{i}]",
                                                                     1), err.fix) from None
        head = model.get_submodule(model.classifier)
        if getattr(head, "out_features", data.num_classes) != data.num_classes:
            model = fit_ncm(model, data, bs, device, precision)
            info = {**info, keys.TEACHER_HEAD: "ncm"}
        logits, y = predict(model, data.train, bs, device, precision)
        scores.append(float((logits.argmax(1) == y.to(logits.device)).double().mean()))
        pool.append((node, model, info))
        sources.append({"arch": node.arch, **{k.split(keys.SEP, 1)[1]: v
                                                       for k, v in info.items()}})
    return pool, scores, {keys.TEACHERS_ENTRIES: sources, keys.TEACHERS_SCORES: scores}
