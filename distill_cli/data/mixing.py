"""Batch mixing — mixup, CutMix and MIX-KD's partial mixup — as pure functions of a generator.

`mix_batch(x, y, num_classes, spec, generator)` returns the mixed batch, `[B, C]` float label
distributions and an `info` dict. Every random number comes from `generator` (a CPU
`torch.Generator`), drawn in the fixed order below, and only the small parameter tensors are
moved to `x.device`; the pixels are mixed with whole-batch tensor ops (no per-sample Python).
The caller seeds the generator from `(seed, epoch, step)` — `mix_generator(seed, epoch, step)` =
`derive_seed("mix", seed, epoch, step)` — so a step's mixing is reproducible and a resumed run
mixes exactly as the uninterrupted one. The teacher must be fed the SAME mixed `x` (the caller's
job); mixing is linear/elementwise, so it commutes with per-channel normalisation.

Modes (one per batch; rows keep their order, row `i` is always based on sample `i`):

* mixup (Zhang et al.; timm "batch" mode): one `λ ~ Beta(α, α)` per batch,
  `x' = λ·x + (1−λ)·x[perm]`, `y' = λ·onehot(y) + (1−λ)·onehot(y[perm])`, `perm` a uniform
  random permutation of the batch (timm pairs with `x.flip(0)`; a permutation avoids fixed pairs).
* CutMix (Yun et al., as timm's `rand_bbox` + `correct_lam`): `λ ~ Beta(α, α)`, one box per batch
  with side `int(size·(1−λ)^(1/d))` per spatial axis (d = 2 for `[B,C,H,W]`, 1 for `[B,C,L]`),
  centre uniform over the image, clipped at the borders; pixels inside the box come from
  `x[perm]`; λ is then CORRECTED to the true kept area: `λ = 1 − box_area / image_area`.
* both alphas > 0: CutMix with probability `switch_prob`, else mixup (timm).
* partial (MIX-KD's "PMU", authors' code `PMU(inputs, targets, percent=0.9, beta_a=1.0)`): each
  row gets its own `a_i ~ Beta(α, α)` (α = `partial.alpha`, default 1 = uniform), then a set of
  rows is forced to `a = 1` (kept unmixed): `x'_i = a_i·x_i + (1−a_i)·x[perm]_i`, same for the
  one-hots.
    - `with_replacement: true` (default; the authors' code exactly, as they ran it): `n_keep =
      floor(B·keep_fraction)` row indices are drawn WITH replacement
      (`torch.randint(0, B, (int(B·percent),))`), so only `1 − (1 − 1/B)^n_keep`
      ≈ `1 − e^(−0.9)` ≈ 59% of the rows are kept on average, ~41% are mixed.
    - `with_replacement: false` (the option; what METHODS.md's "~90% of samples keep a=1"
      says): exactly `n_keep` distinct rows are kept.
    `keep_fraction: 0` mixes every row: the authors' full mixup `FMU` (`--pmixup False`), a
    per-row `a`, unlike `mixup_alpha`'s one λ per batch. `loss=mixkd` brings
    conf/augment/mixkd.yaml (keep 0.9 with replacement, α 1) and refuses a run without it
    (losses/mixkd.py `check_partial_mixup`). The authors also
      shuffle the base batch (`inputs[rp1]`) before mixing with `inputs[rp2]`; we keep the base in
      batch order and pair with `perm` — the same joint distribution of (sample, partner, a), up
      to the (loss-irrelevant) order of the rows.
* `prob`: the chosen mode is applied with probability `prob`, else `x` is returned as is (the same
  tensor, not a copy) with one-hot targets.

Draw order (documented so a step can be recomputed): `u = rand(1)` (apply iff `u < prob`); stop
if not applied. If both alphas > 0: `v = rand(1)` (CutMix iff `v < switch_prob`). `perm =
randperm(B)`. mixup: `λ` (one Beta draw, float64). CutMix: `λ`, then the centre, one
`randint(0, size)` per spatial axis in order (H then W). partial: `a` (B Beta draws), then the
kept rows (`randperm(B)[:n_keep]` or `randint(0, B, (n_keep,))`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from distill_cli.seeding import derive_seed
from distill_cli.errors import UserError

_MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "partial")
_PARTIAL_KEYS = ("keep_fraction", "with_replacement", "alpha")


#: the overrides that turn every kind of batch mixing off (named in user-error fixes)
MIX_OFF = "augment.mix.mixup_alpha=0 augment.mix.cutmix_alpha=0 augment.mix.partial=null"


@dataclass(frozen=True)

class PartialSpec:
    """MIX-KD partial mixup: keep `keep_fraction` of the rows unmixed, mix the rest with
    `a ~ Beta(alpha, alpha)` each (see the module docstring for `with_replacement`)."""

    keep_fraction: float = 0.9   # authors' `percent`
    with_replacement: bool = True   # the authors' `torch.randint` (≈59% kept at 0.9); false:
                                    # exactly keep_fraction of the rows
    alpha: float = 1.0           # authors' `beta_a`: Beta(1, 1) = uniform

    def n_keep(self, batch_size: int) -> int:
        # floor like the authors' int(B * percent); 1e-9 absorbs float error (100*0.29 = 28.999…)
        return min(batch_size, int(math.floor(batch_size * self.keep_fraction + 1e-9)))


@dataclass(frozen=True)
class MixSpec:
    """Config `augment.mix`: `{mixup_alpha: 0.0, cutmix_alpha: 0.0, prob: 1.0, switch_prob: 0.5,
    partial: null}`; `partial: {keep_fraction: 0.9, with_replacement: true, alpha: 1.0}` (or
    `true` for those defaults: the authors' PMU) selects MIX-KD's partial mixup, which excludes
    the two alphas."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    partial: PartialSpec | None = None

    @property
    def enabled(self) -> bool:
        """Whether `mix_batch` can change a batch at all."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0
                                  or self.partial is not None)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg, key: str = "augment.mix") -> "MixSpec":
        """Build from a dict / DictConfig / None (None = no mixing). Missing keys keep the
        defaults; unknown keys and bad values raise `UserError` naming `key`."""
        if cfg is None:
            return cls()
        if isinstance(cfg, MixSpec):
            return cfg
        cfg = _mapping(cfg, key, "{mixup_alpha: 0.2, cutmix_alpha: 1.0}")
        _reject_unknown(cfg, _MIX_KEYS, key, "mixing")
        values = {}
        for name, lo, hi in (("mixup_alpha", 0.0, math.inf), ("cutmix_alpha", 0.0, math.inf),
                             ("prob", 0.0, 1.0), ("switch_prob", 0.0, 1.0)):
            if cfg.get(name) is not None:
                values[name] = _number(cfg[name], f"{key}.{name}", lo, hi)
        partial = cfg.get("partial")
        if partial is not None and partial is not False:
            values["partial"] = _partial(partial, f"{key}.partial")
            if values.get("mixup_alpha", 0.0) > 0 or values.get("cutmix_alpha", 0.0) > 0:
                raise UserError("partial mixup is its own mode and cannot be combined with "
                                "mixup_alpha/cutmix_alpha", key=key,
                                fix="Set mixup_alpha=0 and cutmix_alpha=0 (partial.alpha sets "
                                    "its Beta), or partial=null")
        return cls(**values)


def _mapping(cfg, key: str, example: str) -> Mapping:
    if isinstance(cfg, Mapping):
        return cfg
    try:  # omegaconf DictConfig and look-alikes
        return dict(cfg)
    except Exception:
        raise UserError(f"`{key}` must be a mapping like {example}, got {cfg!r}", key=key) from None


def _reject_unknown(cfg: Mapping, allowed: tuple[str, ...], key: str, what: str) -> None:
    unknown = sorted(set(map(str, cfg.keys())) - set(allowed))
    if unknown:
        raise UserError(f"unknown {what} option(s) {unknown}", key=key,
                        fix=f"Use only {list(allowed)}")


def _number(value, key: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not lo <= float(value) <= hi:
        raise UserError(f"`{key}` must be a number in [{lo}, {hi}], got {value!r}", key=key)
    return float(value)


def _partial(cfg, key: str) -> PartialSpec:
    if cfg is True:
        return PartialSpec()
    cfg = _mapping(cfg, key, "{keep_fraction: 0.9, with_replacement: true}")
    _reject_unknown(cfg, _PARTIAL_KEYS, key, "partial-mixup")
    values = {}
    if cfg.get("keep_fraction") is not None:
        values["keep_fraction"] = _number(cfg["keep_fraction"], f"{key}.keep_fraction", 0.0, 1.0)
    if cfg.get("with_replacement") is not None:
        if not isinstance(cfg["with_replacement"], bool):
            raise UserError(f"`{key}.with_replacement` must be true or false, got "
                            f"{cfg['with_replacement']!r}", key=f"{key}.with_replacement")
        values["with_replacement"] = cfg["with_replacement"]
    if cfg.get("alpha") is not None:
        values["alpha"] = _number(cfg["alpha"], f"{key}.alpha", 0.0, math.inf)
        if values["alpha"] <= 0:
            raise UserError(f"`{key}.alpha` must be > 0", key=f"{key}.alpha",
                            fix="Use 1.0 (uniform, the authors' default)")
    return PartialSpec(**values)


def mix_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator for batch `step` of `epoch`: `derive_seed("mix", seed, epoch, step)`."""
    return torch.Generator().manual_seed(derive_seed("mix", seed, epoch, step))


def sample_beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` draws of Beta(alpha, alpha) (float64, CPU) from `generator`: the first coordinate of a
    Dirichlet(alpha, alpha), the kernel `torch.distributions.Beta` itself uses."""
    conc = torch.full((n, 2), float(alpha), dtype=torch.float64)
    return torch._sample_dirichlet(conc, generator=generator)[:, 0]


def _targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[B]` int labels → one-hot float32; `[B, C]` float distributions → float32 as given."""
    if y.dim() == 1 and not y.is_floating_point():
        return F.one_hot(y, num_classes).float()
    if y.dim() == 2 and y.is_floating_point() and y.shape[1] == num_classes:
        return y.float()
    raise ValueError(f"y must be [B] int labels or [B, {num_classes}] float distributions, got "
                     f"shape {tuple(y.shape)} dtype {y.dtype}")


def _blend(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """`lam·a + (1−lam)·b` with a per-row `lam` `[B]`."""
    lam = lam.view((-1,) + (1,) * (a.dim() - 1)).to(device=a.device, dtype=a.dtype)
    return lam * a + (1 - lam) * b


def _cutmix_box(lam: float, sizes: tuple[int, ...], generator: torch.Generator
                ) -> tuple[tuple[int, int], ...]:
    """timm `rand_bbox`: side `int(size·(1−λ)^(1/d))`, centre uniform, clipped per axis."""
    ratio = (1.0 - lam) ** (1.0 / len(sizes))
    box = []
    for size in sizes:
        cut = int(size * ratio)
        centre = int(torch.randint(0, size, (1,), generator=generator))
        box.append((min(max(centre - cut // 2, 0), size), min(max(centre + cut // 2, 0), size)))
    return tuple(box)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, spec: MixSpec,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mix a batch. x: float `[B, ...]` (`[B,C,H,W]` or `[B,C,L]` for CutMix); y: `[B]` int
    labels (or `[B, C]` float distributions). Returns `(x_mixed, y_soft [B, C] float32, info)`
    with info = `{"mode": "none"|"mixup"|"cutmix"|"partial", "lam": [B] float32 weight of each
    row's own sample, "perm": [B] int64 partner rows, "box": ((lo, hi), ...) | None}` (tensors on
    `x.device`). Rows of `y_soft` sum to 1."""
    if not x.is_floating_point():
        raise ValueError(f"mix_batch needs a float (normalised) batch, got {x.dtype}")
    b, dev = x.shape[0], x.device
    targets = _targets(y.to(dev), num_classes)
    none = {"mode": "none", "lam": torch.ones(b, device=dev), "perm": torch.arange(b, device=dev),
            "box": None}
    if not spec.enabled or b == 0:
        return x, targets, none
    if not float(torch.rand(1, generator=generator)) < spec.prob:
        return x, targets, none

    if spec.partial is not None:
        mode = "partial"
    elif spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        mode = "cutmix" if float(torch.rand(1, generator=generator)) < spec.switch_prob else "mixup"
    else:
        mode = "cutmix" if spec.cutmix_alpha > 0 else "mixup"
    perm = torch.randperm(b, generator=generator)
    box = None

    if mode == "mixup":
        lam = sample_beta(spec.mixup_alpha, 1, generator).expand(b)
        x_out = _blend(x, x[perm.to(dev)], lam)
    elif mode == "cutmix":
        if x.dim() not in (3, 4):
            raise ValueError(f"CutMix needs a [B,C,H,W] or [B,C,L] batch, got {tuple(x.shape)}")
        lam0 = float(sample_beta(spec.cutmix_alpha, 1, generator))
        sizes = tuple(x.shape[2:])
        box = _cutmix_box(lam0, sizes, generator)
        inside = torch.ones((), dtype=torch.bool, device=dev)
        for axis, (lo, hi) in enumerate(box):  # outer product of per-axis [lo, hi) masks
            r = torch.arange(sizes[axis], device=dev)
            inside = inside.unsqueeze(-1) & ((r >= lo) & (r < hi))
        x_out = torch.where(inside, x[perm.to(dev)], x)
        area = math.prod(hi - lo for lo, hi in box)
        lam = torch.full((b,), 1.0 - area / math.prod(sizes), dtype=torch.float64)
    else:  # partial (MIX-KD PMU)
        p = spec.partial
        lam = sample_beta(p.alpha, b, generator)
        n_keep = p.n_keep(b)
        kept = (torch.randint(0, b, (n_keep,), generator=generator) if p.with_replacement
                else torch.randperm(b, generator=generator)[:n_keep])
        lam[kept] = 1.0
        x_out = _blend(x, x[perm.to(dev)], lam)

    lam = lam.to(torch.float32).to(dev)
    perm = perm.to(dev)
    y_soft = _blend(targets, targets[perm], lam)
    return x_out, y_soft, {"mode": mode, "lam": lam, "perm": perm, "box": box}


def training_batches(split, batch_size: int, data_seed: int, epoch: int, start_step: int,
                     spec: MixSpec, num_classes: int):
    """The training batches of `epoch` as the student (and the teacher) see them: the split's
    augmented batches, mixed when `spec` is enabled — still a pure function of
    (data_seed, epoch, step), so stored teacher outputs and resumed runs match exactly."""
    batches = split.train_batches(batch_size, data_seed, epoch, start_step=start_step)
    for step, batch in enumerate(batches, start=start_step):
        if spec.enabled:
            x, y, _ = mix_batch(batch.x, batch.y, num_classes, spec,
                                mix_generator(data_seed, epoch, step))
            batch = batch._replace(x=x, y=y)
        yield batch
