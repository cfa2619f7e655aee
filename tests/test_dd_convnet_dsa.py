"""Dataset distillation's matching network (ConvNet-D, models/convnet.py), its reproducible
construction (tasks/dataset_distill/nets.py) and Differentiable Siamese Augmentation
(tasks/dataset_distill/dsa.py), each checked against references written from the authors'
definitions (DatasetCondensation networks.py ConvNet, utils.py ParamDiffAug / rand_*)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DIGITS, make_cfg
from distill_cli.config import build
from distill_cli.errors import UserError
from distill_cli.models import ClassifierInput, FeatureTaps, create
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.nets import (
    build_net, flat_params, functional_forward, load_flat_, unflatten)

NET = {"arch": "convnet", "width": 128, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------- ConvNet

@pytest.mark.parametrize("c,size,first,feat", [(1, 8, 8, 128 * 1 * 1), (1, 28, 32, 128 * 4 * 4),
                                               (3, 32, 32, 128 * 4 * 4)])
def test_convnet_shapes(c, size, first, feat):
    net = create("convnet", 10, c, (size, size))
    x = torch.randn(2, c, size, size)
    with FeatureTaps(net, ["features.0", *net.stages]) as taps, ClassifierInput(net) as pen:
        logits = net(x)
    assert logits.shape == (2, 10)
    # the 28x28 rule: the first conv pads 3, so the first map is 32x32
    assert taps["features.0"].shape == (2, 128, first, first)
    sides = [first // 2, first // 4, first // 8]
    assert [tuple(taps[s].shape[1:]) for s in net.stages] == [(128, s, s) for s in sides]
    assert net.embed(x).shape == (2, feat) and net.feature_dim == feat
    # the classifier reads the last map flattened (not averaged as the rest of the zoo)
    torch.testing.assert_close(pen.value, taps[net.stages[-1]].flatten(1))
    torch.testing.assert_close(net.embed(x), pen.value)


def test_convnet_layers_are_the_authors():
    net = create("convnet", 10, 3, (32, 32))
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    for m in net.features:
        if isinstance(m, nn.Conv2d):
            assert m.kernel_size == (3, 3) and m.padding == (1, 1) and m.bias is not None
        if isinstance(m, nn.GroupNorm):   # instance norm with an affine: 128 groups of 1
            assert m.num_groups == m.num_channels == 128 and m.affine
        if isinstance(m, nn.ReLU):
            assert not m.inplace          # hooks see the activation itself
        if isinstance(m, nn.AvgPool2d):
            assert m.kernel_size == 2 and m.stride == 2
    assert net.get_submodule(net.classifier) is net.fc


def test_convnet3_cifar10_parameter_count_equals_the_authors():
    # by hand: conv 3->128 (3*9*128 + 128), GN (2*128), 2 x [conv 128->128 (128*9*128 + 128),
    # GN (2*128)], linear 2048 -> 10 (2048*10 + 10)
    expected = (3 * 9 * 128 + 128) + 256 + 2 * ((128 * 9 * 128 + 128) + 256) + (2048 * 10 + 10)
    assert expected == 320_010
    net = create("convnet", 10, 3, (32, 32))
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("options,kinds", [
    ({"norm": "batchnorm", "act": "leakyrelu", "pool": "maxpool"},
     [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU, nn.MaxPool2d]),
    ({"norm": "layernorm", "act": "sigmoid", "pool": "avgpooling"},
     [nn.Conv2d, nn.LayerNorm, nn.Sigmoid, nn.AvgPool2d]),
    ({"norm": "none", "act": "swish", "pool": "none"}, [nn.Conv2d, nn.SiLU]),
])
def test_convnet_options(options, kinds):
    net = create("convnet", 10, 3, (32, 32), width=16, depth=2, **options)
    assert [type(m) for m in net.features] == kinds * 2
    if options["norm"] == "layernorm":   # the authors' LayerNorm over the whole [C, h, w] map
        assert net.features[1].normalized_shape == (16, 32, 32)
        assert net.features[5].normalized_shape == (16, 16, 16)
    if options["pool"] == "none":
        assert net.feature_dim == 16 * 32 * 32
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_depth_that_pools_below_1x1_is_a_user_error():
    create("convnet", 10, 1, (8, 8), width=8, depth=3)          # 8 -> 4 -> 2 -> 1 fits
    with pytest.raises(UserError) as err:
        create("convnet", 10, 1, (8, 8), width=8, depth=4)
    assert err.value.key == "depth" and "student.depth" in err.value.fix
    assert "3" in err.value.fix and "8x8" in err.value.what
    create("convnet", 10, 1, (8, 8), width=8, depth=4, pool="none")   # nothing is pooled
    create("convnet", 10, 1, (28, 28), width=8, depth=5)        # 28 -> 32 -> ... -> 1
    with pytest.raises(UserError):
        create("convnet", 10, 1, (28, 28), width=8, depth=6)


@pytest.mark.parametrize("options,key", [({"norm": "weightnorm"}, "norm"),
                                         ({"act": "gelu"}, "act"), ({"pool": "avg"}, "pool"),
                                         ({"width": 0}, "width"), ({"depth": 0}, "depth"),
                                         ({"norm": "groupnorm", "width": 6}, "width")])
def test_convnet_bad_options_are_user_errors(options, key):
    with pytest.raises(UserError) as err:
        create("convnet", 10, 3, (32, 32), **options)
    assert err.value.key == key


def test_convnet_student_config_builds_and_refuses_a_deep_net_on_digits():
    cfg = make_cfg(["dataset=digits", "student=convnet", "student.width=16"])
    data = build.build_data(cfg.dataset)
    model = build.build_model(cfg.student, "student", data)
    assert model.embed(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    cfg = make_cfg(["dataset=digits", "student=convnet", "student.depth=4"])
    with pytest.raises(UserError) as err:
        build.build_model(cfg.student, "student", data)
    assert "student.depth" in err.value.paragraph()


def test_convnet_trains_as_a_classification_student(tmp_path):
    from distill_cli.io import read_json
    from distill_cli.training.run import run

    run(make_cfg(DIGITS + ["student=convnet", "student.width=16", "loss=ce",
                           "trainer.epochs=1"]), tmp_path / "run", tty=False)
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["status"] == "finished"


# ---------------------------------------------------------------------------------- nets.py

def test_build_net_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = build_net(NET, (1, 8, 8), 10, seed=3)
    after = torch.get_rng_state()
    assert torch.equal(before, after)
    torch.manual_seed(999)                     # another global state: same network
    b = build_net(NET, (1, 8, 8), 10, seed=3)
    c = build_net(NET, (1, 8, 8), 10, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert isinstance(a.features[1], nn.GroupNorm) and a.fc.in_features == 128


def test_build_net_accepts_a_dictconfig_and_names_the_key_in_errors():
    from omegaconf import OmegaConf

    node = OmegaConf.create({**NET, "width": 8})
    assert build_net(node, (3, 32, 32), 10, seed=0).feature_dim == 8 * 4 * 4
    with pytest.raises(UserError) as err:
        build_net({**NET, "depth": 4}, (1, 8, 8), 10, seed=0)
    assert err.value.key == "task.net.depth"
    with pytest.raises(UserError) as err:
        build_net({**NET, "depth": 4}, (1, 8, 8), 10, seed=0, key="loss.net")
    assert err.value.key == "loss.net.depth"
    with pytest.raises(UserError) as err:
        build_net({"arch": "convnet9"}, (1, 8, 8), 10, seed=0)
    assert err.value.key == "task.net.arch"
    with pytest.raises(UserError) as err:
        build_net({"width": 8}, (1, 8, 8), 10, seed=0)
    assert err.value.key == "task.net.arch"


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_functional_forward_equals_the_module(norm):
    net = build_net({**NET, "width": 8, "norm": norm}, (3, 32, 32), 10, seed=1).eval()
    x = torch.randn(4, 3, 32, 32)
    flat = flat_params(net).detach()
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(functional_forward(net, flat, x), net(x), rtol=0, atol=0)
    # another vector: the same as loading it into the module
    other = flat + 0.01 * torch.randn(flat.shape, generator=gen(2))
    out = functional_forward(net, other, x)
    load_flat_(net, other)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    assert torch.equal(flat_params(net).detach(), other)


def test_functional_forward_is_differentiable_in_the_flat_vector():
    net = build_net({**NET, "width": 8}, (1, 8, 8), 10, seed=1)
    flat = flat_params(net).detach().requires_grad_(True)
    step = flat - 0.1 * torch.ones_like(flat)            # a non-leaf, as in MTT's unroll
    functional_forward(net, step, torch.randn(3, 1, 8, 8)).square().sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())   # the module's own are untouched
    parts = unflatten(net, flat)
    assert list(parts) == [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError):
        unflatten(net, flat[:-1])


# ------------------------------------------------------------------------------------- DSA

def x64(b=3, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(seed), dtype=torch.float64)


def params(family, h=8, w=8, **values) -> dsa.DSAParams:
    n = len(next(iter(values.values())))
    # float parameters in float64 as `sample` draws them (bools and ints keep their type)
    return dsa.DSAParams(family, n, h, w, {
        k: torch.as_tensor(v, dtype=torch.float64 if isinstance(v[0], float) else None)
        for k, v in values.items()})


def test_identity_strategies_return_x():
    x = x64()
    for strategy in ("", "none", "None"):
        assert dsa.augment(x, strategy, gen()) is x
        assert dsa.apply(x, dsa.sample(strategy, 1, gen(), 8, 8)) is x


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError) as err:
        dsa.families("color_crop_blur")
    assert err.value.key == "dsa_strategy" and "blur" in err.value.what
    with pytest.raises(UserError) as err:
        dsa.augment(x64(), "flip_zoom", gen())
    assert dsa.families(dsa.STRATEGY_DEFAULT) == dsa.FAMILIES


def test_color_against_the_formulas():
    x = x64()
    b, s, c = [0.1, 0.5, 0.9], [0.0, 0.3, 1.0], [0.2, 0.7, 0.0]
    out = dsa.apply(x, params("color", brightness=b, saturation=s, contrast=c))
    ref = x.numpy().copy()
    for i in range(3):
        y = ref[i] + (b[i] - 0.5) * 1.0                              # brightness
        m = y.mean(axis=0, keepdims=True)                             # per-pixel channel mean
        y = (y - m) * (s[i] * 2.0) + m                                # saturation
        m = y.mean()                                                  # per-image mean
        ref[i] = (y - m) * (c[i] + 0.5) + m                           # contrast
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_flip_against_torch_flip():
    x = x64()
    out = dsa.apply(x, params("flip", flip=[True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))


def test_crop_is_an_integer_translation_with_zero_fill():
    x = x64(h=8, w=6)
    shifts = [(1, -1), (-1, 0), (0, 1)]
    out = dsa.apply(x, params("crop", h=8, w=6, shift_h=[s[0] for s in shifts],
                              shift_w=[s[1] for s in shifts]))
    for i, (sh, sw) in enumerate(shifts):   # padded roll: pad by 2, roll by -shift, crop back
        padded = torch.nn.functional.pad(x[i], [2, 2, 2, 2])
        ref = torch.roll(padded, shifts=(-sh, -sw), dims=(1, 2))[:, 2:10, 2:8]
        assert torch.equal(out[i], ref), (sh, sw)
    # larger shifts than the 1-px pad still read zeros (the authors' clamp into the border)
    x32 = x64(b=1, h=32, w=32)
    out = dsa.apply(x32, params("crop", h=32, w=32, shift_h=[4], shift_w=[-3]))
    padded = torch.nn.functional.pad(x32[0], [8, 8, 8, 8])
    assert torch.equal(out[0], torch.roll(padded, (-4, 3), (1, 2))[:, 8:40, 8:40])


def test_cutout_against_a_clipped_square():
    x = x64(h=8, w=8)
    centres = [(0, 0), (4, 5), (8, 8)]
    out = dsa.apply(x, params("cutout", centre_h=[c[0] for c in centres],
                              centre_w=[c[1] for c in centres]))
    side = 4   # int(0.5 * 8 + 0.5)
    for i, (ch, cw) in enumerate(centres):
        ref = x[i].clone()
        for r in range(8):
            for c in range(8):
                if ch - side // 2 <= r < ch - side // 2 + side and \
                        cw - side // 2 <= c < cw - side // 2 + side:
                    ref[:, r, c] = 0
        assert torch.equal(out[i], ref), (ch, cw)
    assert (out[0, :, :2, :2] == 0).all() and (out[0, :, 2:, :] == x[0, :, 2:, :]).all()


def bilinear_reference(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """affine_grid + grid_sample (bilinear, zeros, align_corners=False) from the definition:
    output pixel centre -> normalised coords -> theta -> source pixel -> bilinear, zero outside."""
    _, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            sx, sy = theta @ np.array([xn, yn, 1.0])
            u, v = ((sx + 1) * w - 1) / 2, ((sy + 1) * h - 1) / 2
            u0, v0 = math.floor(u), math.floor(v)
            for dv, du in ((0, 0), (0, 1), (1, 0), (1, 1)):
                uu, vv = u0 + du, v0 + dv
                wt = (1 - abs(u - uu)) * (1 - abs(v - vv))
                if 0 <= uu < w and 0 <= vv < h:
                    out[:, i, j] += wt * img[:, vv, uu]
    return out


def test_scale_and_rotate_against_a_bilinear_reference():
    x = x64(b=2, h=8, w=6)
    sx, sy = [1.2, 0.9], [0.85, 1.1]
    out = dsa.apply(x, params("scale", h=8, w=6, sx=sx, sy=sy))
    for i in range(2):
        theta = np.array([[sx[i], 0, 0], [0, sy[i], 0]])
        np.testing.assert_allclose(out[i].numpy(), bilinear_reference(x[i].numpy(), theta),
                                   rtol=1e-10, atol=1e-10)
    angles = [math.radians(15), math.radians(-7)]
    out = dsa.apply(x, params("rotate", h=8, w=6, angle=angles))
    for i, a in enumerate(angles):   # the authors' [[cos, -sin, 0], [sin, cos, 0]]
        theta = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]])
        np.testing.assert_allclose(out[i].numpy(), bilinear_reference(x[i].numpy(), theta),
                                   rtol=1e-10, atol=1e-10)
    # identity parameters are the identity (align_corners=False hits pixel centres exactly)
    torch.testing.assert_close(dsa.apply(x, params("scale", h=8, w=6, sx=[1.0], sy=[1.0])), x)
    torch.testing.assert_close(dsa.apply(x, params("rotate", h=8, w=6, angle=[0.0])), x)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_sampled_parameters_follow_the_authors_ranges(size):
    g = gen(1)
    n = 4000
    crop = dsa.sample("crop", n, g, size, size).values
    k = {8: 1, 28: 4, 32: 4}[size]                 # int(0.125 * size + 0.5): 3.5 rounds up
    assert set(crop["shift_h"].tolist()) == set(range(-k, k + 1)) == set(crop["shift_w"].tolist())
    cut = dsa.sample("cutout", n, g, size, size).values
    assert set(cut["centre_h"].tolist()) == set(range(size + 1))  # even side: 0..size
    flip = dsa.sample("flip", n, g, size, size).values["flip"]
    assert abs(flip.double().mean().item() - 0.5) < 0.05
    scale = dsa.sample("scale", n, g, size, size).values
    for v in (scale["sx"], scale["sy"]):
        assert v.min() >= 1 / 1.2 and v.max() <= 1.2 and v.max() - v.min() > 0.3
    assert not torch.equal(scale["sx"], scale["sy"])
    angle = dsa.sample("rotate", n, g, size, size).values["angle"]
    assert angle.abs().max() <= math.radians(15) and angle.abs().max() > math.radians(14)
    color = dsa.sample("color", n, g, size, size).values
    for v in color.values():
        assert v.min() >= 0 and v.max() < 1


def test_mode_s_picks_one_family_uniformly():
    g = gen(2)
    counts = {f: 0 for f in dsa.FAMILIES}
    for _ in range(1200):
        counts[dsa.sample(dsa.STRATEGY_DEFAULT, 1, g, 8, 8).family] += 1
    assert all(120 < c < 280 for c in counts.values()), counts   # 200 each expected
    assert {dsa.sample("crop_flip", 1, g, 8, 8).family for _ in range(50)} == {"crop", "flip"}


def test_sampling_is_a_function_of_the_generator():
    a = dsa.sample(dsa.STRATEGY_DEFAULT, 5, gen(3), 8, 8)
    b = dsa.sample(dsa.STRATEGY_DEFAULT, 5, gen(3), 8, 8)
    assert a.family == b.family and all(torch.equal(a.values[k], b.values[k]) for k in a.values)
    x = x64(b=5)
    assert torch.equal(dsa.augment(x, dsa.STRATEGY_DEFAULT, gen(4)),
                       dsa.augment(x, dsa.STRATEGY_DEFAULT, gen(4)))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    dsa.augment(x, dsa.STRATEGY_DEFAULT, gen(4))
    assert torch.equal(state, torch.get_rng_state())   # the global RNG is never used


@pytest.mark.parametrize("family", dsa.FAMILIES)
def test_siamese_parameters_give_one_transform_for_both_batches(family):
    """Sampled once (n=1) and applied to a real batch of 5 and a synthetic batch of 2 whose
    images are copies of the real ones: identical outputs, image for image."""
    for seed in range(5):
        p = dsa.sample(family, 1, gen(seed), 8, 8)
        real = x64(b=5, seed=seed)
        syn = real[[3, 0]].clone()
        out_real, out_syn = dsa.apply(real, p), dsa.apply(syn, p)
        assert torch.equal(out_real[[3, 0]], out_syn)
        # ... and it is the same transform for every image: each equals its own n=1 apply
        assert torch.equal(out_real[1:2], dsa.apply(real[1:2], p))


@pytest.mark.parametrize("family", dsa.FAMILIES)
def test_gradients_flow_to_x(family):
    x = torch.randn(4, 3, 8, 8, generator=gen(5), requires_grad=True)
    p = dsa.sample(family, 4, gen(6), 8, 8)
    weights = torch.randn(4, 3, 8, 8, generator=gen(7))
    (dsa.apply(x, p) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if family == "cutout":   # no gradient reaches the cut pixels, all others get theirs
        cut = dsa.apply(torch.ones(4, 3, 8, 8), p) == 0
        assert (x.grad[cut] == 0).all() and torch.equal(x.grad[~cut], weights[~cut])
    if family == "flip":     # an involution: the gradient is the flipped upstream gradient
        assert torch.equal(x.grad, dsa.apply(weights, p))
    if family == "crop":     # the adjoint of a zero-fill shift by s is the shift by -s
        back = dsa.DSAParams("crop", 4, 8, 8, {k: -v for k, v in p.values.items()})
        assert torch.equal(x.grad, dsa.apply(weights, back))


def test_apply_refuses_parameters_of_another_batch_or_size():
    p = dsa.sample("color", 3, gen(), 8, 8)
    with pytest.raises(ValueError):
        dsa.apply(x64(b=4), p)
    with pytest.raises(ValueError):
        dsa.apply(x64(b=3, h=16, w=16), p)


def test_float32_and_channels():
    x = torch.randn(2, 1, 8, 8, generator=gen(8))
    for family in dsa.FAMILIES:   # grayscale: saturation is the identity up to its mean
        y = dsa.apply(x, dsa.sample(family, 2, gen(9), 8, 8))
        assert y.dtype == torch.float32 and y.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_apply_on_the_gpu_matches_the_cpu():
    x = x64(b=4).float()
    for family in dsa.FAMILIES:
        p = dsa.sample(family, 4, gen(10), 8, 8)
        torch.testing.assert_close(dsa.apply(x.cuda(), p).cpu(), dsa.apply(x, p),
                                   rtol=1e-5, atol=1e-5)
