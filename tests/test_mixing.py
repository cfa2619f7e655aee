"""Batch mixing (mixup, CutMix, MIX-KD partial mixup): formulas recomputed from the documented
draw order of the same generator seed, determinism, and config parsing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_cli.seeding import derive_seed
from distill_cli.data.mixing import (MixSpec, PartialSpec, mix_batch, mix_generator,
                                     sample_beta)
from distill_cli.errors import UserError

C = 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 16, shape=(3, 8, 8), seed: int = 1):
    g = gen(seed)
    return torch.randn((b,) + shape, generator=g), torch.randint(0, C, (b,), generator=g)


def onehot(y):
    return F.one_hot(y, C).float()


def test_mixup_matches_formula_recomputed_from_seed():
    x, y = batch()
    spec = MixSpec(mixup_alpha=0.4)
    xm, ym, info = mix_batch(x, y, C, spec, gen(7))
    # documented draw order: u (apply), perm, lambda
    g = gen(7)
    assert float(torch.rand(1, generator=g)) < 1.0
    perm = torch.randperm(16, generator=g)
    lam = float(sample_beta(0.4, 1, g))
    assert info["mode"] == "mixup" and info["box"] is None
    assert torch.equal(info["perm"], perm)
    assert torch.allclose(info["lam"], torch.full((16,), lam))
    assert 0.0 < lam < 1.0
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm], atol=1e-6)
    assert torch.allclose(ym, lam * onehot(y) + (1 - lam) * onehot(y[perm]), atol=1e-6)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert ym.dtype == torch.float32 and ym.shape == (16, C)


def test_sample_beta_has_the_beta_mean_and_variance():
    a = 0.4
    draws = sample_beta(a, 20000, gen(0))
    assert draws.dtype == torch.float64 and ((draws >= 0) & (draws <= 1)).all()
    assert abs(draws.mean().item() - 0.5) < 0.01
    assert abs(draws.var().item() - 1 / (4 * (2 * a + 1))) < 0.01  # Beta(a,a): 1/(4(2a+1))


@pytest.mark.parametrize("shape", [(3, 12, 10), (2, 20)])
def test_cutmix_box_pixels_and_true_area(shape):
    x, y = batch(8, shape)
    spec = MixSpec(cutmix_alpha=1.0)
    for seed in range(6):
        xm, ym, info = mix_batch(x, y, C, spec, gen(seed))
        assert info["mode"] == "cutmix"
        perm, box = info["perm"], info["box"]
        inside = torch.zeros(shape[1:], dtype=torch.bool)
        inside[tuple(slice(lo, hi) for lo, hi in box)] = True
        assert torch.equal(xm[..., inside], x[perm][..., inside])   # box: the partner
        assert torch.equal(xm[..., ~inside], x[..., ~inside])       # elsewhere: the original
        lam = 1.0 - inside.sum().item() / inside.numel()           # the TRUE area fraction
        assert torch.allclose(info["lam"], torch.full((8,), lam))
        assert torch.allclose(ym, lam * onehot(y) + (1 - lam) * onehot(y[perm]), atol=1e-6)
        assert torch.allclose(ym.sum(1), torch.ones(8))


def test_cutmix_box_follows_timm_rand_bbox():
    x, y = batch(4, (1, 16, 16))
    _, _, info = mix_batch(x, y, C, MixSpec(cutmix_alpha=1.0), gen(3))
    g = gen(3)
    torch.rand(1, generator=g)
    torch.randperm(4, generator=g)
    lam0 = float(sample_beta(1.0, 1, g))
    cut = int(16 * math.sqrt(1 - lam0))
    cy, cx = (int(torch.randint(0, 16, (1,), generator=g)) for _ in range(2))
    clip = lambda v: min(max(v, 0), 16)  # noqa: E731
    assert info["box"] == ((clip(cy - cut // 2), clip(cy + cut // 2)),
                           (clip(cx - cut // 2), clip(cx + cut // 2)))


def test_switch_prob_selects_between_modes():
    x, y = batch()
    modes = {s: [mix_batch(x, y, C, MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=s),
                           gen(i))[2]["mode"] for i in range(40)] for s in (0.0, 0.5, 1.0)}
    assert set(modes[0.0]) == {"mixup"}
    assert set(modes[1.0]) == {"cutmix"}
    assert set(modes[0.5]) == {"mixup", "cutmix"}


@pytest.mark.parametrize("spec", [MixSpec(mixup_alpha=0.3), MixSpec(cutmix_alpha=1.0),
                                  MixSpec(partial=PartialSpec(with_replacement=False)),
                                  MixSpec(partial=PartialSpec(with_replacement=True))])
def test_same_seed_same_output_different_seed_different(spec):
    x, y = batch()
    a = mix_batch(x, y, C, spec, gen(11))
    b = mix_batch(x, y, C, spec, gen(11))
    c = mix_batch(x, y, C, spec, gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2]["perm"], b[2]["perm"])
    assert not torch.equal(a[0], c[0])


def test_mix_generator_is_derived_from_seed_epoch_step():
    a = torch.rand(3, generator=mix_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=gen(derive_seed("mix", 1, 2, 3))))
    assert not torch.equal(a, torch.rand(3, generator=mix_generator(1, 2, 4)))


@pytest.mark.parametrize("spec", [MixSpec(mixup_alpha=1.0, prob=0.0), MixSpec(),
                                  MixSpec(partial=PartialSpec(), prob=0.0)])
def test_disabled_or_prob_zero_leaves_batch_unchanged(spec):
    x, y = batch()
    xm, ym, info = mix_batch(x, y, C, spec, gen(0))
    assert xm is x and info["mode"] == "none"
    assert torch.equal(ym, onehot(y))
    assert torch.equal(info["lam"], torch.ones(16))


def test_prob_applies_to_about_that_fraction_of_batches():
    x, y = batch(4)
    applied = [mix_batch(x, y, C, MixSpec(mixup_alpha=1.0, prob=0.3), gen(i))[2]["mode"] != "none"
               for i in range(400)]
    assert 0.22 < sum(applied) / 400 < 0.38


def _check_partial_rows(x, y, xm, ym, info):
    lam, perm = info["lam"], info["perm"]
    kept = lam == 1.0
    assert torch.equal(xm[kept], x[kept]) and torch.equal(ym[kept], onehot(y)[kept])
    assert torch.allclose(xm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm],
                          atol=1e-6)
    assert torch.allclose(ym, lam[:, None] * onehot(y) + (1 - lam[:, None]) * onehot(y[perm]),
                          atol=1e-6)
    assert torch.allclose(ym.sum(1), torch.ones(len(y)))
    return kept


@pytest.mark.parametrize("b,frac", [(16, 0.9), (100, 0.9), (10, 0.5), (100, 0.29), (7, 0.0)])
def test_partial_without_replacement_keeps_exactly_the_fraction(b, frac):
    x, y = batch(b)
    spec = MixSpec(partial=PartialSpec(keep_fraction=frac, with_replacement=False))
    for seed in range(3):
        xm, ym, info = mix_batch(x, y, C, spec, gen(seed))
        assert info["mode"] == "partial"
        kept = _check_partial_rows(x, y, xm, ym, info)
        assert int(kept.sum()) == math.floor(b * frac + 1e-9)
        mixed = info["lam"][~kept]
        assert ((mixed > 0) & (mixed < 1)).all()  # Beta(1, 1) never hits exactly 1


def test_partial_recomputed_from_seed():
    x, y = batch(16)
    for repl in (False, True):
        _, _, info = mix_batch(x, y, C, MixSpec(partial=PartialSpec(with_replacement=repl)),
                               gen(5))
        g = gen(5)
        torch.rand(1, generator=g)
        perm = torch.randperm(16, generator=g)
        a = sample_beta(1.0, 16, g)
        idx = (torch.randint(0, 16, (14,), generator=g) if repl
               else torch.randperm(16, generator=g)[:14])
        a[idx] = 1.0
        assert torch.equal(info["perm"], perm)
        assert torch.equal(info["lam"], a.float())


def test_partial_with_replacement_keeps_about_59_percent():
    """The authors' `torch.randint(0, B, (int(0.9 B),))`: 1 − (1 − 1/B)^(0.9 B) ≈ 1 − e^−0.9."""
    b = 4096
    x, y = torch.zeros(b, 1, 2), torch.zeros(b, dtype=torch.long)
    xm, ym, info = mix_batch(x, y, C, MixSpec(partial=PartialSpec(with_replacement=True)), gen(0))
    frac = (info["lam"] == 1.0).float().mean().item()
    expected = 1 - (1 - 1 / b) ** int(0.9 * b)
    assert abs(expected - (1 - math.exp(-0.9))) < 1e-3
    assert abs(frac - expected) < 0.03  # binomial-ish sd ≈ 0.008
    assert 0.55 < frac < 0.63


def test_partial_alpha_changes_the_beta():
    x, y = batch(2000, (1, 2))
    lam = mix_batch(x, y, C, MixSpec(partial=PartialSpec(keep_fraction=0.0, alpha=0.2)),
                    gen(0))[2]["lam"]
    assert lam.var().item() > 1 / 12 + 0.05  # U-shaped Beta(.2,.2) var 1/5.6 vs uniform 1/12


def test_soft_targets_in_and_device_and_dtype():
    x, y = batch(6)
    soft = torch.softmax(torch.randn(6, C, generator=gen(2)), 1)
    xm, ym, info = mix_batch(x, soft, C, MixSpec(mixup_alpha=1.0), gen(0))
    lam, perm = info["lam"][:, None], info["perm"]
    assert torch.allclose(ym, lam * soft + (1 - lam) * soft[perm], atol=1e-6)
    assert info["lam"].device == x.device and info["perm"].dtype == torch.int64
    with pytest.raises(ValueError):
        mix_batch(x.to(torch.uint8), y, C, MixSpec(mixup_alpha=1.0), gen(0))
    with pytest.raises(ValueError):
        mix_batch(torch.randn(6, 5), y, C, MixSpec(cutmix_alpha=1.0), gen(0))


# ------------------------------------------------------------------------------------ config
def test_from_config_defaults_and_values():
    assert MixSpec.from_config(None) == MixSpec() and not MixSpec().enabled
    spec = MixSpec.from_config(OmegaConf.create(
        {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 0.5, "switch_prob": 0.3,
         "partial": None}))
    assert spec == MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.5, switch_prob=0.3)
    assert spec.enabled
    p = MixSpec.from_config({"partial": {"keep_fraction": 0.8, "with_replacement": True}})
    assert p.partial == PartialSpec(keep_fraction=0.8, with_replacement=True) and p.enabled
    assert MixSpec.from_config({"partial": True}).partial == PartialSpec()
    assert not MixSpec.from_config({"mixup_alpha": 1.0, "prob": 0.0}).enabled
    assert MixSpec.from_config({"partial": {}}).as_dict()["partial"]["keep_fraction"] == 0.9


@pytest.mark.parametrize("cfg,key", [
    ({"mixup": 0.2}, "augment.mix"),
    ({"mixup_alpha": -1}, "augment.mix.mixup_alpha"),
    ({"prob": 1.5}, "augment.mix.prob"),
    ({"switch_prob": "half"}, "augment.mix.switch_prob"),
    ({"partial": {"keep": 0.9}}, "augment.mix.partial"),
    ({"partial": {"keep_fraction": 2.0}}, "augment.mix.partial.keep_fraction"),
    ({"partial": {"with_replacement": "yes"}}, "augment.mix.partial.with_replacement"),
    ({"partial": {"alpha": 0}}, "augment.mix.partial.alpha"),
    ({"partial": True, "mixup_alpha": 0.2}, "augment.mix"),
    ("mixup", "augment.mix"),
])
def test_from_config_errors_name_the_key(cfg, key):
    with pytest.raises(UserError) as err:
        MixSpec.from_config(cfg)
    assert err.value.key == key
