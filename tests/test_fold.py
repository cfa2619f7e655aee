"""BatchNorm folding of frozen teachers (distill_cli/models/fold.py): same logits and stage
outputs (float rounding), BN modules gone where a conv feeds them alone, nothing folded where the
conv's output is used elsewhere, and a teacher run records how many were folded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_cli.training.run import run
from distill_cli.models import FeatureTaps, create
from distill_cli.models.fold import fold_batchnorm

from conftest import DIGITS, make_cfg


def trained_stats(model: nn.Module, shape) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 2 + 0.5)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("arch, shape", [("resnet8", (3, 32, 32)), ("cnn", (1, 28, 28)),
                                         ("wrn_16_2", (3, 32, 32)), ("mobilenetv2", (3, 32, 32)),
                                         ("shufflenetv2", (3, 32, 32))])
def test_folded_model_computes_the_same(arch, shape):
    model = trained_stats(create(arch, 10, shape[0], shape[1:]), shape)
    x = torch.randn(8, *shape)
    with FeatureTaps(model, model.stages) as taps:
        ref_logits = model(x)
        ref_stages = [taps[p].clone() for p in model.stages]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folded > 0 and left == n_bn - folded
    with FeatureTaps(model, model.stages) as taps:   # stage paths still resolve and fire
        logits = model(x)
        stages = [taps[p] for p in model.stages]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(stages, ref_stages):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_every_bn_of_a_plain_cnn_is_folded():
    model = trained_stats(create("cnn", 10, 1, (28, 28)), (1, 28, 28))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == n_bn == 6     # 3 stages x 2 convs, each conv -> BN


class SharedOutput(nn.Module):
    """conv's output feeds the BN AND a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Reused(nn.Module):
    """one BN module applied after two convs (weight sharing): not foldable into either."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_an_untraceable_model_is_left_as_it_is():
    """vgg's forward branches on feature-map sizes, which torch.fx cannot trace: no fold."""
    model = trained_stats(create("vgg8", 10, 3, (32, 32)), (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    assert fold_batchnorm(model) == 0 and torch.equal(model(x), ref)


@pytest.mark.parametrize("cls", [SharedOutput, Reused])
def test_unsafe_pairs_are_left_alone(cls):
    model = trained_stats(cls(), (3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    assert fold_batchnorm(model) == 0
    assert torch.equal(model(x), ref)


def test_training_mode_is_refused():
    with pytest.raises(ValueError):
        fold_batchnorm(create("resnet8", 10, 3, (32, 32)).train())


def test_a_frozen_teacher_is_folded_and_still_scores_the_same(tmp_path, digits_teacher):
    summary = run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                                     "student=mlp", "loss=kd", "trainer.epochs=1"]),
                  tmp_path / "r", tty=False)
    # resnet8: stem + 3 blocks x 2 convs + 2 projection shortcuts = 9 BNs, all folded
    assert summary["teacher/bn_folded"] == 9
    unfolded = create("resnet8", 10, 1, (8, 8))
    unfolded.load_state_dict(torch.load(digits_teacher, weights_only=True)["model"])
    from distill_cli.config.build import build_data
    from distill_cli.tasks.classification.evaluate import predict, score
    data = build_data(make_cfg(DIGITS).dataset)
    t = score(*predict(unfolded.eval(), data.test, 256, torch.device("cpu"), "32"))
    assert summary["teacher/test/acc1"] == t["acc1"]    # folding changed no prediction
