"""Fidelity to the authors' code (issue #18 item 1): each test pins one place where the runner
used to differ from the method's official implementation and would have failed before the fix.

FitNet's regressor = RepDistiller's ConvReg; MIX-KD brings the authors' partial mixup (and refuses
a run without it) and their std-scaled evaluation view; self-distillation follows Borup &
Andersen's procedure (gen0 = the same MSE at α = 1, their Σ‖θ‖ penalty, Adam, the final model
handed on); the zoo's stage taps are RepDistiller's `feat` points; DIST's effective ImageNet
weights; Madry's training-mode attack for `adv_ce` (MTARD's stays in eval mode, as its code);
OFA's token projectors merge towards the official 7x7 grid."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS, make_cfg
from omegaconf import OmegaConf
from test_cli import distill
from torch import nn

from distill_cli.config.build import build_data, build_model, build_objective
from distill_cli.data import Batch
from distill_cli.data.mixing import MixSpec, mix_batch, mix_generator
from distill_cli.errors import UserError
from distill_cli.losses.adv_ce import AdversarialCE
from distill_cli.losses.base import StepContext
from distill_cli.losses.fitnet import FitNet, HintRegressor
from distill_cli.losses.mixkd import MixKD
from distill_cli.losses.mtard import MTARD
from distill_cli.losses.ofa import OFA, PatchMerging, official_merges
from distill_cli.losses.self_distill import SelfDistill, weight_norm_sum
from distill_cli.models import ClassifierInput, FeatureTaps, create, prepool_path
from distill_cli.training.generations import generation_config, handed_on
from distill_cli.training.run import run


# ------------------------------------------------------------------------ FitNet's regressor
def convreg_oracle(s_hw, t_hw):
    """RepDistiller `models/util.py` ConvReg's choice, transcribed as a table: (layer, kernel,
    stride, padding) or None where theirs raises."""
    (sh, sw), (th, tw) = s_hw, t_hw
    if sh == 2 * th:
        return nn.Conv2d, (3, 3), (2, 2), (1, 1)
    if sh * 2 == th:
        return nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)
    if sh >= th:
        return nn.Conv2d, (1 + sh - th, 1 + sw - tw), (1, 1), (0, 0)
    return None


@pytest.mark.parametrize("s_hw,t_hw", [((4, 4), (4, 4)), ((8, 8), (4, 4)), ((2, 2), (4, 4)),
                                       ((6, 6), (4, 4)), ((7, 5), (4, 4)), ((16, 16), (4, 4)),
                                       ((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2))])
def test_fitnet_regressor_is_repdistillers_convreg(s_hw, t_hw):
    reg = HintRegressor((3, *s_hw), (5, *t_hw))   # the default rule
    layer, kernel, stride, padding = convreg_oracle(s_hw, t_hw)
    assert type(reg.conv) is layer
    assert (reg.conv.kernel_size, reg.conv.stride, reg.conv.padding) == (kernel, stride, padding)
    assert reg(torch.randn(2, 3, *s_hw)).shape == (2, 5, *t_hw)


def test_equal_sizes_get_a_1x1_conv_by_default_and_3x3_as_ours():
    cfg = make_cfg(["loss=fitnet"])
    obj = build_objective(cfg.loss)
    assert cfg.loss.regressor == "repdistiller" and obj.regressor == "repdistiller"
    obj.build_heads([torch.Size((8, 4, 4))], [torch.Size((16, 4, 4))], 10)
    assert obj.regressors[0].conv.kernel_size == (1, 1)
    ours = FitNet(regressor="ours")
    ours.build_heads([torch.Size((8, 4, 4))], [torch.Size((16, 4, 4))], 10)
    assert ours.regressors[0].conv.kernel_size == (3, 3)


def test_every_square_size_pair_builds_or_is_refused_exactly_where_convreg_fails():
    for sh in range(1, 10):
        for th in range(1, 10):
            if convreg_oracle((sh, sh), (th, th)) is None:
                with pytest.raises(UserError) as err:
                    HintRegressor((3, sh, sh), (5, th, th))
                assert err.value.key == "loss.regressor" and "ours" in err.value.fix
                # ours handles it (adaptive pooling)
                ours = HintRegressor((3, sh, sh), (5, th, th), rule="ours")
                assert ours(torch.randn(2, 3, sh, sh)).shape == (2, 5, th, th)
            else:
                out = HintRegressor((3, sh, sh), (5, th, th))(torch.randn(2, 3, sh, sh))
                assert out.shape == (2, 5, th, th), (sh, th)
    with pytest.raises(UserError):   # a width the height's rule cannot bring (theirs: MSE fails)
        HintRegressor((3, 8, 3), (5, 4, 4))
    with pytest.raises(UserError) as err:
        FitNet(regressor="convreg")
    assert err.value.key == "loss.regressor"


# ------------------------------------------------------------------------ stage taps (audit)
# RepDistiller's `feat[1:-1]` (is_feat=True, preact=False) per zoo family: module paths here,
# whether those tensors are post-activation (>= 0) or raw (pre-activation, signed), and
# `feat[2]`, FitNet's --hint_layer 2.
REPDISTILLER_FEATS = {
    "resnet8": (("layer1", "layer2", "layer3"), "post", "layer2"),
    "resnet32x4": (("layer1", "layer2", "layer3"), "post", "layer2"),
    "resnet18_cifar": (("layer1", "layer2", "layer3", "layer4"), "post", "layer2"),
    "wrn_16_2": (("block1", "block2", "block3"), "raw", "block2"),
    "vgg8": (("block1", "block2", "block3", "block4"), "post", "block2"),
    "mobilenetv2": (("blocks.1", "blocks.2", "blocks.4", "blocks.6"), "raw", "blocks.2"),
    "shufflenetv1": (("layer1", "layer2", "layer3"), "post", "layer2"),
    "shufflenetv2": (("layer1", "layer2", "layer3"), "post", "layer2"),
}


@pytest.mark.parametrize("arch", sorted(REPDISTILLER_FEATS))
def test_stage_taps_are_repdistillers_feature_points(arch):
    paths, activation, hint = REPDISTILLER_FEATS[arch]
    torch.manual_seed(0)
    model = create(arch, 10, 3, (32, 32)).train()
    assert model.stages == paths
    x = torch.randn(4, 3, 32, 32)
    with FeatureTaps(model, model.stages) as taps, ClassifierInput(model) as pen:
        model(x)
    for p in paths:
        low = float(taps[p].detach().min())
        assert (low >= 0) if activation == "post" else (low < 0), (p, low)
    # FitNet's default `middle` stage is RepDistiller's feat[2] (--hint_layer 2)
    assert model.stages[(len(model.stages) - 1) // 2] == hint
    assert pen.value.shape == (4, model.feature_dim)


def test_wrn_last_stage_is_the_raw_block3_output_not_the_pooled_bn_relu():
    torch.manual_seed(0)
    model = create("wrn_16_2", 10, 3, (32, 32)).train()
    x = torch.randn(4, 3, 32, 32)
    with FeatureTaps(model, model.stages) as taps, ClassifierInput(model) as pen:
        model(x)
    with torch.no_grad():
        raw = model.block3(model.block2(model.block1(model.conv1(x))))
        pooled = model.relu(model.bn1(raw)).mean(dim=(2, 3))
    torch.testing.assert_close(taps["block3"], raw)
    torch.testing.assert_close(pen.value, pooled)   # RepDistiller feat[-1] stays the bn-relu'd
    assert prepool_path(model) == "relu"            # and the map it is pooled from is named



# ------------------------------------------------------------------------ penultimate features
# What enters each model's classifier and which map is pooled into it, named by hand from the
# model code (RepDistiller feat[-1] / the input of `avg_pool`), not through models.taps.
FC = {"wrn_16_2": "fc", "mobilenetv2": "fc", "shufflenetv2": "linear", "resnet8": "fc"}
POOLED_MAP = {"wrn_16_2": "relu", "mobilenetv2": "conv2", "shufflenetv2": "relu2",
              "resnet8": "layer3"}


class Spy:
    """Own hooks on one model: the classifier's input and output, and the pooled map."""

    def __init__(self, model, arch):
        self.seen = {}
        fc, pooled_map = model.get_submodule(FC[arch]), model.get_submodule(POOLED_MAP[arch])
        self.hooks = [
            fc.register_forward_pre_hook(lambda m, a: self.seen.__setitem__("h", a[0])),
            fc.register_forward_hook(lambda m, a, o: self.seen.__setitem__("logits", o)),
            pooled_map.register_forward_hook(lambda m, a, o: self.seen.__setitem__("map", o))]

    def close(self):
        for h in self.hooks:
            h.remove()


@pytest.fixture(scope="module")
def cifar_like():
    from distill_cli.data.fake import build as fake_data
    data = fake_data(shape=[3, 32, 32], num_classes=10, train_size=40, test_size=8)
    return data, next(iter(data.train.train_batches(8, 0, 1)))


def pair(teacher_arch, student_arch):
    torch.manual_seed(0)
    teacher = create(teacher_arch, 10, 3, (32, 32)).eval().requires_grad_(False)
    return teacher, create(student_arch, 10, 3, (32, 32)).train()


CROSS = [("wrn_16_2", "mobilenetv2"), ("mobilenetv2", "shufflenetv2"),
         ("shufflenetv2", "wrn_16_2"), ("resnet8", "wrn_16_2")]


@pytest.mark.parametrize("teacher_arch,student_arch", CROSS)
def test_rkd_and_crd_read_the_classifiers_input(cifar_like, teacher_arch, student_arch):
    from distill_cli.losses.crd import CRD
    from distill_cli.losses.rkd import RKD, normalised_distances, triplet_cosines
    data, batch = cifar_like
    teacher, student = pair(teacher_arch, student_arch)
    ctx = StepContext(1, 0, 1, 1)
    rkd = RKD()
    rkd.bind(student, teacher, data)
    spies = Spy(student, student_arch), Spy(teacher, teacher_arch)
    terms = rkd.step_terms(student, teacher, batch, ctx)
    h_s, h_t = (spy.seen["h"] for spy in spies)
    assert h_s.shape == (8, student.feature_dim) and h_t.shape == (8, teacher.feature_dim)
    h_s = h_s.detach()
    want_dist = F.smooth_l1_loss(normalised_distances(h_s), normalised_distances(h_t))
    want_angle = F.smooth_l1_loss(triplet_cosines(h_s), triplet_cosines(h_t))
    assert float(terms["rkd_dist"]) == pytest.approx(float(want_dist), rel=1e-5)
    assert float(terms["rkd_angle"]) == pytest.approx(float(want_angle), rel=1e-5)
    # CRD's embeds take the same vectors (and are sized for them)
    crd = CRD(feat_dim=16)
    crd.bind(student, teacher, data)
    assert (crd.embed_s.in_features, crd.embed_t.in_features) == (student.feature_dim,
                                                                  teacher.feature_dim)
    embedded = {}
    crd.embed_s.register_forward_pre_hook(lambda m, a: embedded.__setitem__("s", a[0]))
    crd.embed_t.register_forward_pre_hook(lambda m, a: embedded.__setitem__("t", a[0]))
    crd.step_terms(student, teacher, batch, ctx)
    torch.testing.assert_close(embedded["s"], spies[0].seen["h"], rtol=0, atol=0)
    torch.testing.assert_close(embedded["t"], spies[1].seen["h"], rtol=0, atol=0)
    for spy in spies:
        spy.close()


@pytest.mark.parametrize("teacher_arch,student_arch,semantic", [
    *((t, s, 0.0) for t, s in CROSS),        # widths differ: the relation term alone
    ("wrn_16_2", "wrn_16_2", 30.0), ("mobilenetv2", "mobilenetv2", 30.0),
    ("shufflenetv2", "shufflenetv2", 30.0)])
def test_diswot_distill_reads_the_pooled_map_and_the_classifiers_input(
        cifar_like, teacher_arch, student_arch, semantic):
    """D_sem from the FC gradient of the classifier's input, D_rel on the pooled map — the
    mobilenetv2 / shufflenetv2 pairs were refused before (their last stage is not pooled)."""
    from distill_cli.evaluation.diswot import relation_distance, semantic_distance
    from distill_cli.losses.diswot import DisWOTDistill, fc_gradient
    data, batch = cifar_like
    teacher, student = pair(teacher_arch, student_arch)
    obj = DisWOTDistill(semantic_weight=semantic)
    obj.bind(student, teacher, data)
    spies = Spy(student, student_arch), Spy(teacher, teacher_arch)
    terms = obj.step_terms(student, teacher, batch, StepContext(1, 0, 1, 1))
    s, t = ({k: v.detach() for k, v in spy.seen.items()} for spy in spies)
    want_rel = relation_distance(t["map"], s["map"])
    assert float(terms["d_rel"]) == pytest.approx(float(want_rel), rel=1e-5)
    if semantic:
        want_sem = semantic_distance(fc_gradient(t["logits"], t["h"], batch.y),
                                     fc_gradient(s["logits"], s["h"], batch.y))
        assert float(terms["d_sem"]) == pytest.approx(float(want_sem), rel=1e-4)
    else:
        assert "d_sem" not in terms
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and all(
        p.grad is not None for p in student.get_submodule(POOLED_MAP[student_arch]).parameters())
    for spy in spies:
        spy.close()


def test_diswot_distill_semantic_term_still_refuses_different_classifier_widths(cifar_like):
    data, _ = cifar_like
    from distill_cli.losses.diswot import DisWOTDistill
    teacher, student = pair("wrn_16_2", "mobilenetv2")   # 128 vs 1280 classifier inputs
    with pytest.raises(UserError) as err:
        DisWOTDistill().bind(student, teacher, data)
    assert err.value.key == "loss.semantic_weight" and "1280" in err.value.what


def test_feature_methods_train_on_pairs_whose_last_stage_is_not_pooled(tmp_path):
    """Whole runs on digits: RKD / CRD from a wrn_16_2 teacher into mobilenetv2, DisWOT† with
    both terms between two mobilenetv2 (refused before: blocks.6 is not the classifier's input)."""
    import json
    teacher_run = tmp_path / "teacher"
    run(make_cfg(DIGITS + ["student=wrn_16_2", "loss=ce", "trainer.epochs=1"]), teacher_run,
        tty=False)
    mv2_run = tmp_path / "mv2"
    run(make_cfg(DIGITS + ["student=mobilenetv2", "loss=ce", "trainer.epochs=1"]), mv2_run,
        tty=False)
    jobs = [("rkd", "wrn_16_2", teacher_run, "train/rkd_dist"),
            ("crd", "wrn_16_2", teacher_run, "train/crd"),
            ("diswot", "mobilenetv2", mv2_run, "train/d_sem")]
    for loss, arch, trun, term in jobs:
        out = tmp_path / loss
        summary = run(make_cfg(DIGITS + [f"teacher={arch}", "student=mobilenetv2", f"loss={loss}",
                                         f"teacher.checkpoint={trun}/checkpoints/best.pt",
                                         "trainer.epochs=1"]), out, tty=False)
        assert summary["status"] == "finished", loss
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(term in r and np.isfinite(r[term]) for r in rows), (loss, term)


# ------------------------------------------------------------------------ MIX-KD
def test_loss_mixkd_brings_the_authors_partial_mixup():
    cfg = make_cfg(["loss=mixkd"])
    spec = MixSpec.from_config(cfg.augment.mix)
    assert spec.enabled and spec.partial is not None
    assert (spec.partial.keep_fraction, spec.partial.with_replacement, spec.partial.alpha) \
        == (0.9, True, 1.0)
    assert isinstance(build_objective(cfg.loss), MixKD)
    # a batch of 256 keeps about 1 − e^−0.9 ≈ 59% of its rows unmixed, as the authors' PMU
    x, y = torch.randn(256, 1, 2, 2), torch.randint(0, 10, (256,))
    kept = [float((mix_batch(x, y, 10, spec, mix_generator(0, 1, s))[2]["lam"] == 1).float()
                  .mean()) for s in range(8)]
    assert 0.54 < float(np.mean(kept)) < 0.64
    # the 90% option, and other losses are left alone
    exact = MixSpec.from_config(
        make_cfg(["loss=mixkd", "augment.mix.partial.with_replacement=false"]).augment.mix)
    assert float((mix_batch(x, y, 10, exact, mix_generator(0, 1, 0))[2]["lam"] == 1).float()
                 .mean()) == pytest.approx(int(256 * 0.9) / 256)
    assert make_cfg(["loss=kd"]).augment.mix.partial is None



@pytest.mark.parametrize("value", ["true", "{keep_fraction: 0.9}", "{alpha: 1.0}"])
def test_a_partial_node_defaults_to_the_authors_draw_with_replacement(value):
    """What config.yaml's comment on augment.mix.partial says: any partial node (or `true`) is
    the authors' PMU unless it says otherwise — keep 0.9, drawn WITH replacement."""
    spec = MixSpec.from_config(make_cfg([f"augment.mix.partial={value}"]).augment.mix)
    assert (spec.partial.keep_fraction, spec.partial.with_replacement) == (0.9, True)

@pytest.mark.parametrize("override", ["augment.mix.partial=null", "augment.mix.prob=0"])
def test_mixkd_without_partial_mixup_is_refused(override):
    with pytest.raises(UserError) as err:
        build_objective(make_cfg(["loss=mixkd", override]).loss)
    assert err.value.key == "augment.mix.partial" and "MIX-KD" in err.value.what


def test_mixkd_with_mixing_turned_off_exits_2_on_the_command_line(tmp_path):
    proc = distill(*DIGITS, "teacher=resnet8", "student=mlp", "loss=mixkd",
                   "augment.mix.partial=null", tmp_path=tmp_path, check_rc=2)
    assert "augment.mix.partial" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))


def test_mixkd_run_trains_on_partially_mixed_batches(tmp_path, digits_teacher):
    run(make_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                           "student=mlp", "loss=mixkd", "trainer.epochs=1"]),
        tmp_path / "r", tty=False)
    cfg = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert cfg["augment"]["mix"]["partial"] == {"keep_fraction": 0.9, "with_replacement": True,
                                                "alpha": 1.0}


def test_mixkd_evaluation_view_is_the_authors_std_scaled_outputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=g) * 5
    scaled = MixKD.eval_logits(z)
    torch.testing.assert_close(scaled, z / (z.std(dim=1, keepdim=True) + 1e-7))
    assert torch.equal(scaled.argmax(1), z.argmax(1))   # accuracy unchanged, NLL/ECE not
    assert MixKD.eval_view == "std_scaled"


# ------------------------------------------------------------------------ self-distillation
SD = DIGITS + ["student=mlp", "loss=self_distill", "self_distill.generations=2"]


def test_generation_zero_is_the_same_mse_at_alpha_1_with_the_authors_adam():
    cfg = make_cfg(SD)
    g0 = generation_config(cfg, 0, None, None)
    assert g0.loss._target_.endswith("SelfDistill") and g0.loss.alpha == 1.0
    assert g0.teacher.arch is None and not build_objective(g0.loss).needs_teacher
    for g in (g0, generation_config(cfg, 1, 0.4, None)):
        assert g.optimizer._target_ == "torch.optim.Adam" and g.optimizer.lr == 1e-3
        assert g.scheduler._target_.endswith("constant")
        assert "weight_decay" not in g.optimizer
    ours = generation_config(make_cfg(SD + ["loss.gen0=ce", "loss.optimizer=null",
                                            "loss.scheduler=null"]), 0, None, None)
    assert ours.loss._target_.endswith("CrossEntropy") and ours.optimizer._target_.endswith("SGD")


def test_the_handed_on_teacher_is_the_final_model(tmp_path):
    assert handed_on(tmp_path, make_cfg(SD)) == tmp_path / "checkpoints" / "last.pt"
    assert handed_on(tmp_path, make_cfg(SD + ["loss.teacher_weights=best"])).name == "best.pt"


def test_weight_penalty_is_the_sum_of_parameter_norms():
    torch.manual_seed(0)
    model = create("mlp", 5, 1, (4, 4), hidden=[6])
    x, y, t = torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,)), torch.randn(8, 5)
    obj = SelfDistill(alpha=0.3, weight_penalty=1e-2)
    teacher = SimpleNamespace(train_logits=lambda batch: t)
    terms = obj.train_terms(model, model, teacher, Batch(torch.arange(8), x, y), None)
    norms = sum(np.sqrt((p.detach().double().numpy() ** 2).sum()) for p in model.parameters())
    p = F.softmax(model(x).double(), 1).detach().numpy()
    onehot, pt = np.eye(5)[y.numpy()], F.softmax(t.double(), 1).numpy()
    mse = 0.3 * np.mean((p - onehot) ** 2) + 0.7 * np.mean((p - pt) ** 2)
    assert float(terms["weight_norm"]) == pytest.approx(norms, rel=1e-6)
    assert float(terms["loss"].detach()) == pytest.approx(mse + 1e-2 * norms, rel=1e-5)
    # its gradient on a weight is weight_penalty * θ/‖θ‖ (+ the MSE's): check it alone
    model.zero_grad()
    (1e-2 * weight_norm_sum(model)).backward()
    w = model.get_submodule(model.classifier).weight
    torch.testing.assert_close(w.grad, 1e-2 * w.detach() / w.detach().norm())


def test_an_explicit_optimizer_with_self_distillation_generations_exits_2(tmp_path):
    proc = distill(*SD, "optimizer=adamw", tmp_path=tmp_path, check_rc=2)
    assert "loss.optimizer" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------ DIST
def test_dist_imagenet_recipe_has_the_official_effective_weights():
    cfg = make_cfg(["recipe=imagenet_r34_r18_dist"])
    # official: DIST(beta=1, gamma=1, tau=1) x kd_loss_weight 2, CE x 1
    assert (cfg.loss.temperature, cfg.loss.beta, cfg.loss.gamma, cfg.loss.ce_weight) \
        == (1.0, 2.0, 2.0, 1.0)
    assert (cfg.teacher.name, cfg.student.name) == ("resnet34", "resnet18")
    assert cfg.optimizer.nesterov is True and cfg.trainer.epochs == 100
    cifar = make_cfg(["loss=dist"]).loss   # official dist_t4 x kd_loss_weight 2
    assert (cifar.temperature, cifar.beta, cifar.gamma) == (4.0, 2.0, 2.0)


# ------------------------------------------------------------------------ adversarial attacks
@pytest.fixture(scope="module")
def digits():
    cfg = make_cfg(DIGITS + ["student=resnet8"])
    data = build_data(cfg.dataset)
    return cfg, data


def bn_modes(model):
    """Records, per BatchNorm forward, whether it ran in training mode."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.training))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return seen, hooks


@pytest.mark.parametrize("attack_bn,during_attack", [("train", True), ("eval", False)])
def test_adv_ce_attacks_the_training_mode_graph_by_default(digits, attack_bn, during_attack):
    cfg, data = digits
    assert make_cfg(["loss=adv_ce"]).loss.attack_bn == "train"
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data).train()
    obj = AdversarialCE(steps=3, attack_bn=attack_bn)
    obj.bind(student, None, data)
    batch = next(iter(data.train.train_batches(16, 0, 1)))
    first_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    seen, hooks = bn_modes(first_bn)
    before = first_bn.num_batches_tracked.item()
    obj.step_terms(student, None, batch, None)
    for h in hooks:
        h.remove()
    assert seen == [during_attack] * 3 + [True]   # 3 attack forwards, then the loss forward
    # Madry's BatchNorm (updates_collections=None) moves its averages on every attack forward
    assert first_bn.num_batches_tracked.item() - before == (4 if during_attack else 1)
    assert student.training


def test_mtard_attacks_the_student_in_eval_mode_as_its_code(digits):
    cfg, data = digits
    torch.manual_seed(0)
    student = build_model(cfg.student, "student", data).train()
    teachers = [build_model(cfg.student, "student", data).eval().requires_grad_(False)
                for _ in range(2)]
    obj = MTARD(steps=3)
    obj.bind(student, teachers, data)
    first_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    seen, hooks = bn_modes(first_bn)
    batch = next(iter(data.train.train_batches(16, 0, 1)))
    obj.step_terms(student, teachers, batch, StepContext(1, 0, 1, 1))
    for h in hooks:
        h.remove()
    # official mtard_inner_loss_ce: model.eval() for the attack, model.train() for the losses
    assert seen == [False] * 3 + [True, True]


# ------------------------------------------------------------------------ OFA token projectors
@pytest.mark.parametrize("side,merges", [(4, 0), (7, 0), (8, 0), (13, 0), (14, 1), (16, 1),
                                         (27, 1), (28, 2), (56, 3), (112, 4)])
def test_official_merge_count_towards_a_7x7_grid(side, merges):
    assert official_merges(side) == merges
    assert official_merges(side) == max(int(np.log2(side / 7)), 0)   # the official expression


def test_token_projector_merges_a_14x14_grid_to_7x7_not_to_the_last_stage_grid():
    # an isotropic ViT on 28 px with 2 px patches: every stage is a 14x14 grid
    student = create("vit_tiny", 5, 1, (28, 28), patch_size=2, dim=32, depth=3, heads=2)
    teacher = create("resnet8", 5, 1, (28, 28))
    x = torch.randn(2, 1, 28, 28)
    data = SimpleNamespace(val=SimpleNamespace(eval_batches=lambda n: iter([SimpleNamespace(x=x)])),
                           input_shape=(1, 28, 28))
    merged = []
    for final_grid in (7, "last"):
        obj = OFA(stages=[0], final_grid=final_grid)
        obj.bind(student, teacher, data)
        merged.append([m.grid for m in obj.heads[0] if isinstance(m, PatchMerging)])
    assert merged == [[(14, 14)], []]   # official: 14 -> 7; ours: the last stage's 14x14
    assert OmegaConf.select(make_cfg(["loss=ofa"]), "loss.final_grid") == 7
    with pytest.raises(UserError) as err:
        OFA(final_grid=0)
    assert err.value.key == "loss.final_grid"


# ------------------------------------------------------------------------ bad option values
@pytest.mark.parametrize("build,key", [
    (lambda: SelfDistill(gen0="xe"), "loss.gen0"),
    (lambda: SelfDistill(weight_penalty=-1), "loss.weight_penalty"),
    (lambda: SelfDistill(teacher_weights="first"), "loss.teacher_weights"),
    (lambda: AdversarialCE(attack_bn="frozen"), "loss.attack_bn"),
])
def test_new_options_refuse_bad_values(build, key):
    with pytest.raises(UserError) as err:
        build()
    assert err.value.key == key and err.value.fix


def test_bad_generation_option_is_refused_before_any_training(tmp_path):
    from distill_cli.training.launch import launch
    with pytest.raises(UserError) as err:
        launch(make_cfg(SD + ["loss.teacher_weights=first"]), tmp_path / "sd", tty=False)
    assert err.value.key == "loss.teacher_weights" and not (tmp_path / "sd" / "gen0").exists()


def test_mtard_recipe_keys_its_robust_teacher_on_the_attack_mode():
    """The store keys a teacher on its train.loss node as written: naming attack_bn keeps a
    robust teacher stored before the default changed (eval-mode attack) from being reused."""
    robust = make_cfg(["recipe=fmnist_mtard"]).teachers[1]
    assert robust.train.loss.attack_bn == "train"


def test_mixkd_reports_nll_and_ece_of_the_authors_std_scaled_outputs(tmp_path, digits_teacher):
    """The authors validate on `output / std(output)`: the run's test NLL/ECE are of those
    outputs (summary `eval/view: std_scaled`), accuracy is that of the raw logits; a KD run
    reports raw logits."""
    from distill_cli.tasks.classification.evaluate import predict, score
    from distill_cli.training.run import run

    overrides = DIGITS + ["student=mlp", "teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                          "trainer.epochs=1"]
    summary = run(make_cfg(overrides + ["loss=mixkd"]), tmp_path / "mix", tty=False)
    assert summary["eval/view"] == "std_scaled"
    cfg = make_cfg(overrides + ["loss=mixkd"])
    data = build_data(cfg.dataset)
    model = build_model(cfg.student, "student", data)
    model.load_state_dict(torch.load(tmp_path / "mix" / "checkpoints" / "best.pt",
                                     weights_only=True)["model"])
    logits, targets = predict(model, data.test, 256, torch.device("cpu"), "32")
    raw, scaled = score(logits, targets), score(MixKD.eval_logits(logits), targets)
    assert summary["best/test/ece"] == pytest.approx(scaled["ece"], abs=1e-6)
    assert summary["best/test/acc1"] == pytest.approx(raw["acc1"], abs=1e-6)
    assert abs(raw["ece"] - scaled["ece"]) > 1e-3     # the two views differ
    kd = run(make_cfg(overrides + ["loss=kd"]), tmp_path / "kd", tty=False)
    assert kd["eval/view"] == "raw"
