"""PGD L∞ attacks in [0, 1] pixel space, and the robust-accuracy evaluation (`eval.pgd`).

The data pipeline feeds models NORMALISED inputs `x = (x01 − mean) / std` (data/bundle.py,
`InMemorySplit`). An L∞ budget such as ε = 8/255 is defined on the [0, 1] pixels, so the attack
works on `x01 = x·std + mean` against `NormalizedModel(model, mean, std)`, which normalises
inside: the ε-ball and the [0, 1] box are then exactly the published threat model.

    pgd(model, x01, y, eps, step_size, steps, random_start, generator)

Start: `uniform` x01 + U(−ε, ε) (Madry et al. 2018), `normal_0.001` x01 + 0.001·N(0, 1) (MTARD's
training attack) or None (x01 itself); the start is projected like every step (ε-ball ∩ [0, 1]).
Each step: `x ← Π(x + step_size·sign(∇_x CE(model(x), y)))`, Π = projection onto the ε-ball
around x01 intersected with [0, 1] (clamping to both boxes; their intersection holds x01).
CE is the batch mean (labels or, for mixup batches, label distributions). The model is in eval
mode during the attack (each submodule's mode is restored after), and the gradient is taken
with `torch.autograd.grad` w.r.t. the input only, so no parameter `.grad` is touched.
Noise comes from `generator` when given (drawn on the generator's device, then moved), else
from the global torch RNG (training: the engine checkpoints it, so resume stays bit-exact).
"""
from __future__ import annotations

import contextlib
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.seeding import derive_seed
from distill_cli.errors import UserError
from distill_cli.numerics import autocast

RANDOM_STARTS = ("uniform", "normal_0.001", None)


def as_number(value, key: str) -> float:
    """A float from a number or a fraction string such as "8/255" (how budgets are written)."""
    if isinstance(value, bool):
        raise UserError(f"`{key}` must be a number, got {value!r}", key, "Use e.g. 8/255")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"`{key}` must be a number or a fraction like 8/255, got {value!r}", key,
                        "Use e.g. 8/255 or 0.0314") from None


def check_attack(eps, step_size, steps, random_start, key: str) -> tuple[float, float, int]:
    """Validated (eps, step_size, steps); `key` is the config node (e.g. `loss`, `eval.pgd`)."""
    eps, step_size = as_number(eps, f"{key}.eps"), as_number(step_size, f"{key}.step_size")
    if not eps > 0:
        raise UserError(f"`{key}.eps` must be > 0, got {eps}", f"{key}.eps", "Use e.g. 8/255")
    if not step_size > 0:
        raise UserError(f"`{key}.step_size` must be > 0, got {step_size}", f"{key}.step_size",
                        "Use e.g. 2/255")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"`{key}.steps` must be an integer >= 0, got {steps!r}", f"{key}.steps",
                        "Use e.g. 10")
    if random_start not in RANDOM_STARTS:
        raise UserError(f"`{key}.random_start={random_start}` is not an option",
                        f"{key}.random_start", "Use uniform, normal_0.001 or null")
    return eps, step_size, steps


class NormalizedModel(nn.Module):
    """`forward(u) = model((u − mean) / std)`: a model that takes [0, 1] pixels."""

    def __init__(self, model: nn.Module, mean, std, device=None):
        super().__init__()
        self.model = model
        # built on `device` directly: `.to()` on this wrapper would move the wrapped model too
        mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.register_buffer("mean", mean.reshape(-1), persistent=False)
        self.register_buffer("std", std.reshape(-1), persistent=False)

    def normalize(self, u: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (u.dim() - 2)
        return (u - self.mean.to(u.device).view(view)) / self.std.to(u.device).view(view)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: normalised inputs back to [0, 1] pixels."""
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.std.to(x.device).view(view) + self.mean.to(x.device).view(view)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(u))


def pixel_stats(split, key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of an in-memory IMAGE split, whose pixels live in [0, 1]; anything
    else (a DataLoader split, float signals) has no [0, 1] pixel space to attack."""
    mean, std = getattr(split, "mean", None), getattr(split, "std", None)
    x = getattr(split, "x", None)
    if mean is None or std is None or x is None or x.dtype != torch.uint8:
        raise UserError("PGD attacks work in [0, 1] pixel space, which needs an in-memory image "
                        f"dataset with per-channel mean/std (got {type(split).__name__}"
                        f"{'' if x is None else f' of {x.dtype}'})", key,
                        "Use an in-memory image dataset (digits, fashion_mnist, cifar*, fake)"
                        + (" or set eval.pgd.steps=0" if key.startswith("eval") else
                           " or another loss"))
    return mean, std


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every submodule in eval mode; each one's own mode restored on exit (a frozen teacher
    inside a training model stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _noise(kind: str, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    draw = torch.rand if kind == "uniform" else torch.randn
    if generator is None:
        return draw(x.shape, device=x.device, dtype=x.dtype)
    return draw(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def pgd(model: nn.Module, x01: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
        steps: int, random_start: str | None = "uniform",
        generator: torch.Generator | None = None) -> torch.Tensor:
    """The PGD L∞ adversarial version of `x01` (pixels in [0, 1]) against `model` (module
    docstring). Returns a detached tensor in the ε-ball around `x01` and in [0, 1]."""
    if random_start not in RANDOM_STARTS:
        raise ValueError(f"random_start must be one of {RANDOM_STARTS}, got {random_start!r}")
    x01 = x01.detach()
    lo, hi = (x01 - eps).clamp(0.0, 1.0), (x01 + eps).clamp(0.0, 1.0)
    if random_start == "uniform":
        x = x01 + (2 * _noise("uniform", x01, generator) - 1) * eps
    elif random_start == "normal_0.001":
        x = x01 + 0.001 * _noise("normal", x01, generator)
    else:
        x = x01.clone()
    x = torch.max(torch.min(x, hi), lo)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x).float(), y)
            grad, = torch.autograd.grad(loss, [x])
            x = x.detach() + step_size * grad.sign()
            x = torch.max(torch.min(x, hi), lo)
    return x.detach()


# ------------------------------------------------------------------------- robust evaluation
def pgd_settings(node, *, seed: int = 0, batch_size: int = 256, precision: str = "32"
                 ) -> dict | None:
    """`robust_accuracy` keyword arguments from the `eval.pgd` node (a mapping; None = off) when
    `steps > 0`, else None; `seed` seeds the subset and the start noise."""
    node = node or {}
    steps = node.get("steps", 0)
    if steps == 0 and not isinstance(steps, bool):
        return None
    start = node.get("random_start", "uniform")
    start = None if start in (None, "none", "null") else start
    eps, step_size, steps = check_attack(node.get("eps", "8/255"), node.get("step_size", 0.003),
                                         steps, start, "eval.pgd")
    limit = node.get("max_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"eval.pgd.max_samples={limit} must be a positive integer or null",
                        "eval.pgd.max_samples", "Use e.g. 1000 (null = the whole test set)")
    return {"eps": eps, "step_size": step_size, "steps": steps, "random_start": start,
            "max_samples": limit, "seed": int(seed), "batch_size": int(batch_size),
            "precision": str(precision)}


def robust_accuracy(model: nn.Module, split, *, eps: float, step_size: float, steps: int,
                    random_start: str | None = "uniform", max_samples: int | None = None,
                    seed: int = 0, batch_size: int = 256, precision: str = "32") -> float:
    """Top-1 accuracy (percent) of `model` on PGD examples of `split` (eval mode, its fixed
    order). Randomness (the `max_samples` subset, then the start noise batch by batch) comes from
    a CPU generator seeded from `seed`, never the global RNG: the same seed attacks the same
    images with the same noise (best and last weights are compared on equal terms)."""
    mean, std = pixel_stats(split, "eval.pgd")
    g = torch.Generator().manual_seed(derive_seed("pgd-eval", seed))
    n = len(split)
    keep = None
    if max_samples is not None and max_samples < n:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[:max_samples]] = True
        keep = keep.to(split.device)
    wrapped = NormalizedModel(model, mean, std, split.device)
    correct = total = 0
    for batch in split.eval_batches(batch_size):
        x, y = batch.x, batch.y
        if keep is not None:
            mask = keep[batch.index]
            x, y = x[mask], y[mask]
            if len(y) == 0:
                continue
        with autocast(split.device, precision):
            x_adv = pgd(wrapped, wrapped.pixels(x), y, eps, step_size, steps, random_start, g)
            with eval_mode(wrapped), torch.no_grad():
                pred = wrapped(x_adv).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)
