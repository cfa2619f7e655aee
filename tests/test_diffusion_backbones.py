"""The diffusion backbones (models/diffusion/unet.py, dit.py) and their zoo builders.

Real torch, real YAMLs from conf/student. Most checks build with zero_init=False: with DDPM's /
DiT's zero-initialised output layers a fresh net outputs exactly 0, which would make "the class /
the time changes the output" and "gradients reach every parameter" vacuous. The zero-init
behaviour itself is pinned separately.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.models import FeatureTaps, create
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.dit import DiT
from distill_cli.models.diffusion.unet import UNet

NUM_CLASSES = 10
# (in_channels, size): sklearn digits, Fashion-MNIST, CIFAR
SIZES = [(1, 8), (1, 28), (3, 32)]


def small_unet(c: int, size: int, conditional: bool = True, **kw) -> UNet:
    # 3 levels: 28 -> 14 -> 7, 32 -> 16 -> 8, 8 -> 4 -> 2; attention wherever a level is 7/8/4
    opts = {"channels": 16, "channel_mult": (1, 2, 2), "attn_resolutions": (8, 7, 4),
            "zero_init": False}
    return UNet(c, (size, size), NUM_CLASSES, conditional, **{**opts, **kw})


def small_dit(c: int, size: int, conditional: bool = True, **kw) -> DiT:
    p = 2 if size < 16 else 4
    opts = {"dim": 32, "depth": 2, "heads": 2, "zero_init": False}
    return DiT(c, (size // p, size // p), p, NUM_CLASSES, conditional, **{**opts, **kw})


BACKBONES = {"unet": small_unet, "dit": small_dit}


def inputs(c: int, size: int, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g)
    t = torch.rand(b, generator=g) * 1000
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    return x, t, y


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def yaml_options(name: str) -> dict:
    """conf/student/<name>.yaml resolved (task.* absent -> the oc.select defaults), without
    _target_ and arch: the options a composed config hands `create`."""
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "student" / f"{name}.yaml"),
                                 resolve=True)
    return {k: v for k, v in cfg.items() if k not in ("_target_", "arch")}


@pytest.mark.parametrize("c,size", SIZES, ids=[f"{c}x{s}" for c, s in SIZES])
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_output_shape_is_input_shape(kind, c, size):
    torch.manual_seed(0)
    net = BACKBONES[kind](c, size)
    x, t, y = inputs(c, size)
    out = net(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [28, 7, 9])
def test_unet_odd_sizes_go_down_to_ceil_and_crop_back(size):
    """28 -> 14 -> 7 -> 4 -> 2 (and 7 -> 4 -> 2 -> 1 -> 1): a stride-2 conv takes n to ceil(n/2),
    the up path crops 2*ceil(n/2) back to n; plus a non-square input."""
    torch.manual_seed(0)
    net = UNet(1, (size, size), NUM_CLASSES, False, channels=8, channel_mult=(1, 1, 2, 2, 2),
               attn_resolutions=(4,), zero_init=False)
    x, t, _ = inputs(1, size, b=2)
    assert net(x, t).shape == x.shape
    rect = UNet(2, (12, 20), NUM_CLASSES, False, channels=8, channel_mult=(1, 2, 2),
                zero_init=False)
    xr = torch.randn(2, 2, 12, 20)
    assert rect(xr, t).shape == xr.shape


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_class_conditioning(kind):
    torch.manual_seed(0)
    net = BACKBONES[kind](1, 8).eval()
    x, t, y = inputs(1, 8)
    assert net.class_embed.num_embeddings == NUM_CLASSES + 1  # the null label's row
    with torch.no_grad():
        out = net(x, t, y)
        other = net(x, t, (y + 1) % NUM_CLASSES)
        null = net(x, t, torch.full_like(y, NUM_CLASSES))
        uncond = net(x, t, None)
    assert (out - other).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every row changes
    assert (out - null).abs().amax() > 1e-4
    torch.testing.assert_close(uncond, null, rtol=0, atol=0)  # y=None IS the null label


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_unconditional_net_has_no_class_embedding_and_ignores_y(kind):
    torch.manual_seed(0)
    net = BACKBONES[kind](1, 8, conditional=False).eval()
    x, t, y = inputs(1, 8)
    assert net.class_embed is None
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), net(x, t, None), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_time_changes_the_output(kind):
    torch.manual_seed(0)
    net = BACKBONES[kind](1, 8).eval()
    x, t, y = inputs(1, 8)
    with torch.no_grad():
        out = net(x, t, y)
        assert (out - net(x, t + 37.0, y)).abs().amax(dim=(1, 2, 3)).min() > 1e-4
        # EDM's c_noise scale (ln(sigma)/4, about -1.5..1.1) is resolved too
        small = net(x, torch.full((4,), -1.0), y)
        assert (small - net(x, torch.full((4,), 0.5), y)).abs().amax() > 1e-4
        # a python float / 0-d tensor broadcasts to the batch
        torch.testing.assert_close(net(x, 250.0, y), net(x, torch.full((4,), 250.0), y))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_deterministic_under_manual_seed(kind):
    x, t, y = inputs(1, 8)
    outs, states = [], []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        net = BACKBONES[kind](1, 8).eval()
        states.append(net.state_dict())
        with torch.no_grad():
            outs.append(net(x, t, y))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])  # the seed matters


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    net = BACKBONES[kind](1, 8, dropout=0.1).train()
    x, t, y = inputs(1, 8)
    y[0] = NUM_CLASSES  # a null-label row too (CFG's unconditional input)
    net(x, t, y).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    zero = [n for n, p in net.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing and not zero, (missing, zero)
    names = {n for n, _ in net.named_parameters()}
    assert "class_embed.weight" in names and any(".attn." in n for n in names)
    rows = net.class_embed.weight.grad.abs().sum(dim=1)
    assert rows[NUM_CLASSES] > 0 and rows[y[1:]].gt(0).all()  # the null row and used labels


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_zero_init_starts_at_zero_output_and_still_trains(kind):
    """DDPM / DiT adaLN-Zero: a fresh net outputs exactly 0; the output layer gets a gradient."""
    torch.manual_seed(0)
    net = BACKBONES[kind](1, 8, zero_init=True)
    x, t, y = inputs(1, 8)
    out = net(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    (out - x).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert any(p.grad.any() for n, p in net.named_parameters() if n.startswith("out."))


def test_stages_and_feature_dim():
    torch.manual_seed(0)
    unet = small_unet(1, 28)
    assert unet.stages == ("down.0", "down.1", "down.2", "mid") and unet.feature_dim == 32
    x, t, y = inputs(1, 28, b=2)
    with FeatureTaps(unet, unet.stages) as taps:
        unet(x, t, y)
    assert [tuple(taps[p].shape) for p in unet.stages] == [
        (2, 16, 28, 28), (2, 32, 14, 14), (2, 32, 7, 7), (2, 32, 7, 7)]
    dit = small_dit(1, 28, depth=4)
    assert dit.stages == tuple(f"blocks.{i}" for i in range(4)) and dit.grid_size == (7, 7)
    with FeatureTaps(dit, dit.stages) as taps:
        dit(x, t, y)
    assert all(tuple(taps[p].shape) == (2, 49, dit.feature_dim) for p in dit.stages)


@pytest.mark.parametrize("name,c,size,low,high", [
    ("unet_tiny", 1, 8, 50_000, 150_000),
    ("unet_small", 1, 28, 1_000_000, 2_000_000),
    ("dit_tiny", 1, 28, 500_000, 2_000_000),
    ("unet_small", 3, 32, 1_000_000, 2_000_000),
    ("dit_tiny", 1, 8, 500_000, 2_000_000),
])
def test_yaml_builds_a_denoiser_through_the_zoo(name, c, size, low, high):
    """`create(arch, num_classes, in_channels, input_size, **YAML options)` -> a Denoiser that
    satisfies the zoo contract, at the size the YAML's comment states."""
    options = yaml_options(name)
    arch = OmegaConf.load(Path(CONF_DIR) / "student" / f"{name}.yaml").arch
    torch.manual_seed(0)
    model = create(arch, NUM_CLASSES, c, (size, size), **{**options, "conditional": True})
    assert isinstance(model, Denoiser)
    assert model.process.name == "vp_cosine" and model.param == "v" and model.conditional
    n = n_params(model)
    print(f"\n{name} at {c}x{size}x{size}: {n} parameters")
    assert low <= n <= high, n
    assert model.classifier == "net.out" and all(s.startswith("net.") for s in model.stages)
    for path in (*model.stages, model.classifier):
        model.get_submodule(path)
    assert model.feature_dim == model.net.feature_dim
    z, _, y = inputs(c, size, b=2)
    with FeatureTaps(model, model.stages) as taps:
        out = model(z, torch.tensor([0.3, 0.9]), y)
    assert out.shape == z.shape and set(taps.outputs) == set(model.stages)
    x_hat, eps_hat = model.predict(z, 0.5, y)
    assert x_hat.shape == eps_hat.shape == z.shape


@pytest.mark.parametrize("arch,options,key", [
    ("unet", {"groups": 3}, "groups"),
    ("unet", {"channel_mult": []}, "channel_mult"),
    ("unet", {"channels": 0}, "channels"),
    ("unet", {"num_res_blocks": 0}, "num_res_blocks"),
    ("unet", {"attn_resolutions": [5]}, "attn_resolutions"),
    ("unet", {"dropout": 1.0}, "dropout"),
    ("dit", {"patch_size": 3}, "patch_size"),
    ("dit", {"dim": 96, "heads": 5}, "heads"),
    ("dit", {"dim": 6, "heads": 2}, "dim"),
    ("dit", {"depth": 0}, "depth"),
    ("unet", {"channel": 32}, "arch"),  # a misspelt option: the registry names the options
])
def test_bad_options_are_user_errors(arch, options, key):
    with pytest.raises(UserError) as err:
        create(arch, NUM_CLASSES, 1, (28, 28), **options)
    assert err.value.key == key
    assert err.value.fix


def test_bad_input_shapes_raise_clearly():
    torch.manual_seed(0)
    dit = small_dit(1, 8)
    with pytest.raises(ValueError, match=r"built for \[B, 1, 8, 8\]"):
        dit(torch.randn(2, 1, 16, 16), torch.zeros(2))
    unet = small_unet(1, 8)
    with pytest.raises(ValueError, match=r"expects \[B, 1, H, W\]"):
        unet(torch.randn(2, 3, 8, 8), torch.zeros(2))
