"""The model zoo: registry, the per-model contract, feature taps, published sizes, torchvision."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill_cli.config.paths import CONF_DIR
from distill_cli.errors import UserError
from distill_cli.models import ARCHS, ClassifierInput, FeatureTaps, create, prepool_path
from distill_cli.models.cost import count_params as n_params

CONF = Path(CONF_DIR) / "student"
TOKEN_ARCHS = {"vit_tiny", "mixer"}  # stages are [B, N, D] tokens: tests/test_models_hetero.py
DIFFUSION_ARCHS = {"unet", "dit"}    # denoisers (x_t, t, y) -> x-shaped: tests/test_diffusion_*
IMAGE_ARCHS = sorted(a for a, b in ARCHS.items()
                     if b.input_dims == 2 and a != "tv" and a not in TOKEN_ARCHS
                     and a not in DIFFUSION_ARCHS)
ALL_ZOO = sorted(a for a in ARCHS if a != "tv")
# (in_channels, size, num_classes): sklearn digits, Fashion-MNIST, CIFAR-100
IMAGE_CASES = [(1, 8, 10), (1, 28, 10), (3, 32, 100)]

# RepDistiller's CIFAR-100 sizes in millions (3 input channels, 100 classes)
PUBLISHED_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86,
    "resnet110": 1.73, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "vgg13": 9.46,
    "vgg8": 3.96, "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36,
}


def check_contract(model: nn.Module, x: torch.Tensor, num_classes: int, stage_ndim: int | None):
    """Logits shape, every stage fires with batch dim B, head is a Linear fed feature_dim."""
    with FeatureTaps(model, model.stages) as taps:
        logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    assert set(taps.outputs) == set(model.stages)
    for path in model.stages:
        out = taps.outputs[path]
        assert isinstance(out, torch.Tensor) and out.shape[0] == x.shape[0], path
        if stage_ndim is not None:
            assert out.ndim == stage_ndim, (path, out.shape)
    head = model.get_submodule(model.classifier)
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (model.feature_dim, num_classes)
    return taps


def test_registry_has_the_zoo():
    expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2",
                "vgg8", "vgg13", "mobilenetv2", "shufflenetv1", "shufflenetv2", "mlp", "cnn1d",
                "tv"}
    assert expected <= set(ARCHS)  # other families (e.g. `cnn`) may register more


@pytest.mark.parametrize("in_channels,size,num_classes", IMAGE_CASES,
                         ids=[f"{c}x{s}" for c, s, _ in IMAGE_CASES])
@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_image_models_contract(arch, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = create(arch, num_classes, in_channels, (size, size)).train()
    x = torch.randn(2, in_channels, size, size)
    taps = check_contract(model, x, num_classes, stage_ndim=4)
    # the classifier's input is the pooled penultimate feature (RepDistiller's feat[-1])
    with ClassifierInput(model) as pen:
        model(x)
    assert pen.value.shape == (2, model.feature_dim)
    # the map that gets pooled: the last stage, or the one a model names where RepDistiller's
    # feature points stop earlier (tests/test_fidelity.py pins every RepDistiller tap)
    with FeatureTaps(model, [prepool_path(model)]) as pool_in:
        model(x)
    fmap = pool_in[prepool_path(model)]
    # the DC ConvNet's classifier reads its last map flattened (the authors'), the others pooled
    expected = (fmap.flatten(1) if getattr(model, "head_reads", "mean") == "flatten"
                else fmap.mean(dim=(2, 3)))
    assert expected.shape == pen.value.shape
    torch.testing.assert_close(expected, pen.value)


@pytest.mark.parametrize("arch,stage_ndim", [("cnn1d", 3), ("mlp", 2)])
def test_1d_models_on_mnist1d_shapes(arch, stage_ndim):
    model = create(arch, 10, 1, (40,))
    taps = check_contract(model, torch.randn(4, 1, 40), 10, stage_ndim)
    assert taps.outputs[model.stages[-1]].shape[1] == model.feature_dim


def test_mlp_options_and_any_input():
    model = create("mlp", 10, 1, (28, 28), hidden=[64], dropout=0.5)
    assert model.stages == ("hidden.0",) and model.feature_dim == 64
    check_contract(model, torch.randn(3, 1, 28, 28), 10, stage_ndim=2)
    linear = create("mlp", 3, 3, (8, 8), hidden=[])
    assert linear.stages == ("flatten",) and linear.feature_dim == 3 * 8 * 8
    check_contract(linear, torch.randn(2, 3, 8, 8), 3, stage_ndim=2)


@pytest.mark.parametrize("arch", sorted(PUBLISHED_M))
def test_cifar100_parameter_counts_match_published(arch):
    n = n_params(create(arch, 100, 3, (32, 32)))
    assert n / 1e6 == pytest.approx(PUBLISHED_M[arch], rel=0.02), n


@pytest.mark.parametrize("size,block4_side", [(32, 4), (64, 4), (8, 1)])
def test_vgg_pooling_follows_repdistiller(size, block4_side):
    model = create("vgg8", 10, 3, (size, size))
    with FeatureTaps(model, ["block4"]) as taps:
        model(torch.randn(2, 3, size, size))
    assert taps["block4"].shape[-2:] == (block4_side, block4_side)


def test_create_is_deterministic_under_seed():
    for arch in ALL_ZOO:
        shape = (40,) if arch == "cnn1d" else (16,) if arch == "gpt" else (32, 32)
        states = []
        for _ in range(2):
            torch.manual_seed(123)
            states.append(create(arch, 10, 1, shape).state_dict())
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), arch


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_2", "mobilenetv2", "cnn1d"])
def test_gradients_flow_through_logits_and_taps(arch):
    shape = (40,) if arch == "cnn1d" else (32, 32)
    model = create(arch, 10, 1, shape).train()
    x = torch.randn(2, 1, *shape)
    with FeatureTaps(model, model.stages) as taps:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
        loss = loss + sum(taps[s].pow(2).mean() for s in model.stages)  # a feature loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError) as err:
        create("resnet9000", 10, 3, (32, 32))
    assert err.value.key == "arch"
    assert "resnet9000" in err.value.what and "resnet8x4" in err.value.fix


def test_wrong_input_rank_and_unknown_option_are_user_errors():
    with pytest.raises(UserError, match="2-D inputs") as err:
        create("resnet8", 10, 1, (40,))
    assert "cnn1d" in err.value.fix and "mlp" in err.value.fix
    with pytest.raises(UserError, match="1-D inputs"):
        create("cnn1d", 10, 1, (28, 28))
    with pytest.raises(UserError) as err:
        create("mlp", 10, 1, (40,), hiden=[10])
    assert "hiden" in err.value.what and "hidden" in err.value.fix
    with pytest.raises(UserError, match="name"):
        create("tv", 10, 3, (32, 32))  # `name` is required


def test_unknown_tap_path_is_a_user_error_and_leaves_no_hooks():
    model = create("resnet8", 10, 3, (32, 32))
    with pytest.raises(UserError) as err:
        FeatureTaps(model, ["layer1", "layer4"], key="loss.feat_layers")
    assert err.value.key == "loss.feat_layers"
    assert "layer4" in err.value.what
    assert "layer1, layer2, layer3" in err.value.fix and "did you mean" in err.value.fix
    assert not any(m._forward_hooks for m in model.modules())


def test_taps_refresh_on_every_forward_and_close_removes_hooks():
    model = create("resnet8", 10, 3, (32, 32)).eval()
    taps = FeatureTaps(model, ["layer3", "layer3", "fc"])  # duplicates collapse
    assert taps.paths == ("layer3", "fc")
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    logits_a = model(a)
    assert torch.equal(taps["fc"], logits_a)
    first = taps["layer3"]
    model(b)
    assert not torch.equal(taps["layer3"], first)
    taps.close()
    taps.close()  # idempotent
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name,in_channels,size,last_is_feature_dim", [
    ("resnet18", 1, 32, True),
    ("mobilenet_v3_small", 3, 64, False),  # MLP head: feature_dim is its 1024 hidden width
])
def test_torchvision_models(name, in_channels, size, last_is_feature_dim):
    model = create("tv", 7, in_channels, (size, size), name=name).train()
    taps = check_contract(model, torch.randn(2, in_channels, size, size), 7, stage_ndim=4)
    assert all(s.startswith("net.") for s in model.stages)
    assert (taps.outputs[model.stages[-1]].shape[1] == model.feature_dim) is last_is_feature_dim
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


def test_torchvision_resnet_stages():
    model = create("tv", 10, 3, (32, 32), name="resnet18")
    assert model.stages == ("net.layer1", "net.layer2", "net.layer3", "net.layer4")
    assert model.classifier == "net.fc" and model.feature_dim == 512


def test_torchvision_user_errors(monkeypatch):
    with pytest.raises(UserError) as err:
        create("tv", 10, 3, (32, 32), name="resnet19")
    assert "resnet18" in err.value.fix
    with pytest.raises(UserError) as err:
        create("tv", 10, 3, (32, 32), name="resnet18", weights="NOT_A_WEIGHT")
    assert err.value.key == "teacher.weights" and "IMAGENET1K_V1" in err.value.fix

    def offline(*args, **kwargs):  # what an unreachable download looks like; no network used
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torchvision.models.get_model", offline)
    with pytest.raises(UserError, match="Could not load") as err:
        create("tv", 10, 3, (32, 32), name="resnet18", weights="IMAGENET1K_V1")
    assert err.value.key == "teacher.weights"


def test_torchvision_input_too_small_is_a_user_error():
    with pytest.raises(UserError, match="cannot run on inputs"):
        create("tv", 10, 3, (32, 32), name="alexnet")


@pytest.mark.parametrize("cfg_file", sorted(p.name for p in CONF.glob("*.yaml")
                                            if p.stem != "none"))
def test_student_configs_instantiate(cfg_file):
    """conf/student/*.yaml compose into `create` calls the zoo accepts (Hydra's _target_)."""
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONF / cfg_file)
    if cfg.arch == "synthetic":
        pytest.skip("task=dataset_distill's synthetic set, not a zoo network (test_dd_task.py)")
    if cfg.arch == "hf":
        pytest.skip("a local pretrained Hugging Face model (the optional `hf` extra): "
                    "tests/test_hf_teacher.py")
    if cfg.arch == "gpt":  # a language model: ids [B, T] -> [B, T, V] (tests/test_gpt.py)
        model = instantiate(cfg, num_classes=10, in_channels=1, input_size=[8])
        assert model(torch.randint(0, 10, (2, 8))).shape == (2, 8, 10)
        return
    if cfg.arch in DIFFUSION_ARCHS:   # a denoiser: the prediction has the image's shape
        model = instantiate(cfg, num_classes=10, in_channels=1, input_size=[8, 8])
        x = torch.randn(2, 1, 8, 8)
        assert model(x, torch.rand(2)).shape == x.shape
        return
    shape = (40,) if cfg.arch == "cnn1d" else (8, 8)
    model = instantiate(cfg, num_classes=10, in_channels=1, input_size=list(shape))
    assert model(torch.randn(2, 1, *shape)).shape == (2, 10)
