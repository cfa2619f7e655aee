"""DisWOT: both distances vs float64 NumPy, their invariances (batch order, scaling), the
Gaussian re-init never touching the caller's model, the MAC counter vs a hand count, Spearman
with ties, the `distill-search` flow on digits, and DisWOT† (loss vs NumPy, detach, e2e run,
bit-exact resume)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from distill_cli.config.build import build_data, build_model, build_objective
from distill_cli.config.paths import CONF_DIR
from distill_cli.evaluation.diswot import (average_ranks, diswot_score, gaussian_init_, init_seed, probe,
                                relation_distance, scoring_copy, semantic_distance, spearman)
from distill_cli.errors import UserError
from distill_cli.training.run import RunInterrupted, run
from distill_cli.losses.base import StepObjective
from distill_cli.losses.diswot import DisWOTDistill, fc_gradient
from distill_cli.models import create
from distill_cli.models.cost import count_macs, count_params
from distill_cli.search.student_search import search

from conftest import DIGITS, make_cfg


def search_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="search", overrides=overrides)


# ---------------------------------------------------------------- NumPy reference (float64)
def np_normalize_rows(m):
    return m / np.maximum(np.sqrt((m * m).sum(axis=-1, keepdims=True)), 1e-12)


def np_sem(g_t, g_s):
    """Per class the explicit C x C outer product, rows L2-normalised; mean squared diff."""
    mt = np_normalize_rows(g_t[:, :, None] * g_t[:, None, :])
    ms = np_normalize_rows(g_s[:, :, None] * g_s[:, None, :])
    return ((mt - ms) ** 2).mean()


def np_rel(f_t, f_s):
    def a(f):
        f = f.reshape(len(f), -1)
        return np_normalize_rows(f @ f.T)
    return ((a(f_t) - a(f_s)) ** 2).sum() / len(f_t) ** 2


def np_log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_fc_grad(z, h, y):
    p = np.exp(np_log_softmax(z))
    return (p - np.eye(z.shape[1])[y]).T @ h / len(y)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the distances
def test_semantic_distance_matches_numpy_outer_products():
    g = gen(0)
    g_t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    g_s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    g_s[1, 3] = 0.0            # a zero entry: its row of the outer product is zero (eps)
    g_t[4] = 0.0               # a class with zero gradient: all rows zero
    ours = semantic_distance(g_t, g_s)
    assert float(ours) == pytest.approx(np_sem(g_t.numpy(), g_s.numpy()), rel=1e-12, abs=1e-15)
    assert float(semantic_distance(g_t, g_t)) == pytest.approx(0.0, abs=1e-15)


def test_semantic_distance_depends_only_on_each_class_direction_up_to_sign():
    g = gen(1)
    g_t, g_s = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(
        4, 6, generator=g, dtype=torch.float64)
    base = float(semantic_distance(g_t, g_s))
    scale = torch.tensor([0.1, 3.0, 7.0, 0.5], dtype=torch.float64)[:, None]
    assert float(semantic_distance(g_t * scale, g_s)) == pytest.approx(base, rel=1e-12)
    assert float(semantic_distance(-g_t, g_s)) == pytest.approx(base, rel=1e-12)  # g gᵀ = (-g)(-g)ᵀ
    with pytest.raises(ValueError):
        semantic_distance(g_t, g_s[:, :5])


def test_relation_distance_matches_numpy_and_its_invariances():
    g = gen(2)
    f_t = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    f_s = torch.randn(6, 10, generator=g, dtype=torch.float64)   # other per-sample shape: fine
    ours = float(relation_distance(f_t, f_s))
    assert ours == pytest.approx(np_rel(f_t.numpy(), f_s.numpy()), rel=1e-12)
    assert float(relation_distance(f_t, f_t)) == 0.0
    assert float(relation_distance(f_s, f_t)) == pytest.approx(ours, rel=1e-12)  # symmetric
    # one global positive scale cancels in the row normalisation ...
    assert float(relation_distance(3.7 * f_t, f_s)) == pytest.approx(ours, rel=1e-12)
    # ... a per-sample scale a_i does not: row i of the Gram matrix is a_i·(a_j G_ij)_j, the
    # normalisation removes a_i but keeps the a_j across the row
    a = torch.linspace(0.2, 5.0, 6, dtype=torch.float64)
    scaled = f_t * a[:, None, None, None]
    assert abs(float(relation_distance(scaled, f_s)) - ours) > 1e-4
    assert abs(np_rel(scaled.numpy(), f_s.numpy()) - float(relation_distance(scaled, f_s))) < 1e-12


def small_pair():
    teacher = create("cnn", 10, 1, (8, 8), channels=[8, 16, 32], convs_per_stage=2)
    student = create("cnn", 10, 1, (8, 8), channels=[4, 8, 32], convs_per_stage=1)
    g = gen(3)
    x = torch.randn(24, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    return teacher, student, x, y


def test_score_is_invariant_to_batch_order():
    teacher, student, x, y = small_pair()
    a = diswot_score(teacher, student, x, y, seed=5)
    perm = torch.randperm(len(y), generator=gen(4))
    b = diswot_score(teacher, student, x[perm], y[perm], seed=5)
    assert a.d_sem > 0 and a.d_rel > 0
    assert b.d_sem == pytest.approx(a.d_sem, rel=1e-9)
    assert b.d_rel == pytest.approx(a.d_rel, rel=1e-9)
    assert a.score == pytest.approx(-(a.d_sem + a.d_rel))
    # the switches: each term alone
    assert diswot_score(teacher, student, x, y, seed=5, semantic=False).score == \
        pytest.approx(-a.d_rel)
    assert diswot_score(teacher, student, x, y, seed=5, relation=False).score == \
        pytest.approx(-a.d_sem)
    # seeded: same seed same score, another seed another one
    assert diswot_score(teacher, student, x, y, seed=5).score == a.score
    assert diswot_score(teacher, student, x, y, seed=6).score != a.score


def test_score_equals_the_numpy_formula_on_the_probed_tensors():
    teacher, student, x, y = small_pair()
    gt, ft = probe(scoring_copy(teacher, init_seed(0, "teacher")), x, y)
    gs, fs = probe(scoring_copy(student, init_seed(0, "student")), x, y)
    res = diswot_score(teacher, student, x, y, seed=0)
    assert res.d_sem == pytest.approx(np_sem(gt.numpy(), gs.numpy()), rel=1e-10)
    assert res.d_rel == pytest.approx(np_rel(ft.numpy(), fs.numpy()), rel=1e-10)
    assert gt.shape == (10, 32) and ft.shape == (24, 32, 1, 1)   # pre-pool: last stage output



@pytest.mark.parametrize("arch,pooled_map", [("wrn_16_2", "relu"), ("mobilenetv2", "conv2"),
                                             ("shufflenetv2", "relu2"), ("resnet8", "layer3")])
def test_probe_reads_the_pooled_map_and_the_classifiers_gradient(arch, pooled_map):
    """The search's D_rel reads the map that is pooled into the classifier (not the last
    RepDistiller stage, e.g. WRN's raw block3), and its D_sem gradient is DisWOT†'s closed form
    on the classifier's input: search score and loss read the same two tensors."""
    model = scoring_copy(create(arch, 10, 3, (32, 32)), seed=3)
    g = gen(4)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,))
    seen = {}
    fc = model.get_submodule(model.classifier)
    hooks = [model.get_submodule(pooled_map).register_forward_hook(
                 lambda m, a, o: seen.__setitem__("map", o.detach())),
             fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach())),
             fc.register_forward_hook(lambda m, a, o: seen.__setitem__("z", o.detach()))]
    grad, feat = probe(model, x, y)
    for h in hooks:
        h.remove()
    assert torch.equal(feat, seen["map"])
    assert torch.allclose(grad, fc_gradient(seen["z"], seen["h"], y), rtol=1e-9, atol=1e-12)


def test_width_mismatch_is_refused_for_the_semantic_term():
    teacher, _, x, y = small_pair()
    other = create("mlp", 10, 1, (8, 8), hidden=[16])
    with pytest.raises(ValueError, match="widths"):
        diswot_score(teacher, other, x, y)
    assert diswot_score(teacher, other, x, y, semantic=False).d_sem is None


def test_gaussian_reinit_never_touches_the_callers_model():
    teacher, student, x, y = small_pair()
    student.train(False)
    student.requires_grad_(False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    diswot_score(teacher, student, x, y, seed=1)
    scoring_copy(student, 7)
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    assert all(p.dtype == torch.float32 and p.grad is None for p in student.parameters())
    assert not any(m._forward_hooks for m in student.modules())
    # and the copy really is Gaussian: N(0,1) weights, zero biases, BN 1/0, float64, train mode
    clone = scoring_copy(student, 7)
    conv = clone.stage3[0]
    assert clone.fc.weight.dtype == torch.float64 and clone.training
    assert abs(float(conv.weight.std()) - 1.0) < 0.1 and abs(float(conv.weight.mean())) < 0.1
    assert torch.all(clone.fc.bias == 0) and torch.all(clone.stage3[1].weight == 1)
    assert torch.all(clone.stage3[1].bias == 0)
    assert torch.equal(scoring_copy(student, 7).fc.weight, clone.fc.weight)  # seeded
    # weights kept (a trained teacher): eval mode, same values in float64
    kept = scoring_copy(student, None)
    assert not kept.training and torch.equal(kept.fc.weight, student.fc.weight.double())


def test_gaussian_init_covers_linear_conv1d_and_norms():
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(6, 4),
                      nn.LayerNorm(4))
    with torch.no_grad():
        m[1].weight.fill_(3.0)
        m[4].bias.fill_(2.0)
    gaussian_init_(m, gen(0))
    assert torch.all(m[0].bias == 0) and torch.all(m[3].bias == 0)
    assert torch.all(m[1].weight == 1) and torch.all(m[4].bias == 0)


# ---------------------------------------------------------------- MACs and Spearman
def test_mac_counter_matches_a_hand_count():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),              # out 4x8x8=256 el. x (1x3x3)  = 2,304
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),  # out 8x4x4=128 x (2x3x3) = 2,304
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(128, 10))                          # 10 x 128                     = 1,280
    model.train()
    assert count_macs(model, (1, 8, 8)) == 2304 + 2304 + 1280
    assert model.training    # mode restored
    assert not any(m._forward_hooks for m in model.modules())
    assert count_params(model) == (36 + 4) + (8 * 2 * 9 + 8) + 16 + (1280 + 10)
    mlp = create("mlp", 10, 1, (8, 8), hidden=[64])
    assert count_macs(mlp, (1, 8, 8)) == 64 * 64 + 64 * 10


def test_spearman_with_ties_matches_a_hand_computation():
    # x ranks: 10->1, 20->2.5, 20->2.5, 30->4, 40->5 ; y ranks: 1->1.5, 1->1.5, 2->3, 5->4, 9->5
    x, y = [10, 20, 20, 30, 40], [1, 2, 1, 5, 9]
    assert list(average_ranks(x)) == [1, 2.5, 2.5, 4, 5]
    assert list(average_ranks(y)) == [1.5, 3, 1.5, 4, 5]
    # centred ranks: rx = [-2, -.5, -.5, 1, 2], ry = [-1.5, 0, -1.5, 1, 2]
    # sum rx*ry = 3 + 0 + .75 + 1 + 4 = 8.75 ; sum rx^2 = 9.5 ; sum ry^2 = 9.5
    assert spearman(x, y) == pytest.approx(8.75 / 9.5, rel=1e-15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1], [2]))


# ---------------------------------------------------------------- the search command
CANDIDATES = "search.candidates=[{arch: mlp, hidden: [32]}, {arch: cnn, channels: [8, 16, 32]}, " \
             "{arch: resnet8}]"


def test_search_on_digits_ranks_three_candidates_and_distils_the_best(tmp_path, digits_teacher):
    cfg = search_cfg(DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                               CANDIDATES, "search.batch_size=32", "search.top_k=1",
                               "search.train=true", "trainer.epochs=1"])
    result = search(cfg, tmp_path / "s", tty=False)
    on_disk = json.loads((tmp_path / "s" / "search.json").read_text())
    rows = on_disk["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {r["candidate"] for r in rows} == {"mlp hidden=[32]", "cnn channels=[8, 16, 32]",
                                             "resnet8"}
    # widths 32 / 32 / 64 vs the teacher's 64: auto drops D_sem for all, ranks by D_rel
    assert on_disk["semantic"] is False and "D_sem off" in on_disk["note"]
    assert all(r["d_sem"] is None and r["score"] == -r["d_rel"] for r in rows)
    by = {r["arch"]: r for r in rows}
    assert by["mlp"]["macs"] == 64 * 32 + 32 * 10 and by["mlp"]["params"] == 64 * 32 + 32 + 330
    assert on_disk["teacher"]["weights"] == "random"
    md = (tmp_path / "s" / "search.md").read_text()
    assert md.count("\n| ") == 3 + 1 + 1 + 1   # header + 3 rows, trained header + 1 row
    # top-1 distilled with KD (T 4, CE 0.1, KD 0.9) into train/1_<arch>
    best = rows[0]
    child = tmp_path / "s" / "train" / f"1_{best['arch']}"
    summary = json.loads((child / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["loss"] == "KD"
    assert summary["teacher/source"] == "checkpoint"
    assert result["status"] == "trained" and result["train"][0]["run_dir"] == str(child)
    ckpt = torch.load(child / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["config"]["student"]["arch"] == best["arch"] and "search" not in ckpt["config"]
    assert ckpt["config"]["loss"]["temperature"] == 4.0
    # a second search into the same dir is refused
    with pytest.raises(UserError, match="already holds a search"):
        search(cfg, tmp_path / "s", tty=False)


def test_search_with_the_trained_teacher_and_equal_widths_uses_both_terms(tmp_path,
                                                                         digits_teacher):
    base = DIGITS + ["teacher=resnet8", f"teacher.checkpoint={digits_teacher}",
                     "search.candidates=[{arch: resnet8}, {arch: cnn, channels: [8, 16, 64]}]"]
    trained = search(search_cfg(base + ["search.teacher_weights=trained",
                                        "search.semantic=true"]), tmp_path / "a", tty=False)
    random = search(search_cfg(base), tmp_path / "b", tty=False)
    assert trained["semantic"] and random["semantic"]
    for r in trained["rows"]:
        assert r["d_sem"] > 0 and r["d_rel"] > 0
        assert r["score"] == pytest.approx(-(r["d_sem"] + r["d_rel"]))
    assert trained["teacher"]["source"] == "checkpoint"
    assert {r["candidate"]: r["score"] for r in trained["rows"]} != \
        {r["candidate"]: r["score"] for r in random["rows"]}


@pytest.mark.parametrize("override,key", [
    ("search.candidates=[{arch: mlp}, {arch: nosuchnet}]", "search.candidates[1]"),
    ("search.candidates=[{arch: mlp, widths: [3]}]", "search.candidates[0]"),
    ("search.candidates=[{hidden: [3]}]", "search.candidates[0]"),
    ("search.candidates=[]", "search.candidates"),
    ("search.semantic=maybe", "search.semantic"),
    ("search.top_k=0", "search.top_k"),
    ("search.teacher_weights=pretrained", "search.teacher_weights"),
])
def test_bad_search_options_are_user_errors(tmp_path, override, key):
    base = DIGITS + ["teacher=cnn", "search.candidates=[{arch: mlp}]"]
    with pytest.raises(UserError) as err:
        search(search_cfg(base + [override]), tmp_path / "s", tty=False)
    assert err.value.key == key


def test_search_errors_on_missing_teacher_and_forced_semantic_mismatch(tmp_path):
    with pytest.raises(UserError) as err:
        search(search_cfg(DIGITS + ["search.candidates=[{arch: mlp}]"]), tmp_path / "a")
    assert err.value.key == "teacher"
    with pytest.raises(UserError) as err:
        search(search_cfg(DIGITS + ["teacher=cnn", "search.semantic=true",
                                    "search.candidates=[{arch: cnn}, {arch: mlp, hidden: [64]}]"]),
               tmp_path / "b")
    assert err.value.key == "search.candidates[1]"


# ---------------------------------------------------------------- DisWOT† objective
def test_fc_gradient_closed_form_equals_autograd():
    model = create("cnn", 10, 1, (8, 8), channels=[4, 8, 16], convs_per_stage=1).double()
    g = gen(5)
    x, y = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (12,))
    feats = {}
    model.stage3.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    logits = model(x)
    (auto,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), model.fc.weight,
                                  retain_graph=True)
    closed = fc_gradient(logits, feats["f"].mean(dim=(2, 3)), y)
    assert torch.allclose(closed, auto, rtol=1e-10, atol=1e-12)
    soft = torch.softmax(torch.randn(12, 10, generator=g, dtype=torch.float64), 1)
    (auto_soft,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, soft),
                                       model.fc.weight)
    assert torch.allclose(fc_gradient(logits, feats["f"].mean(dim=(2, 3)), soft), auto_soft,
                          rtol=1e-10, atol=1e-12)


def loss_inputs(seed=6, b=8, k=5, c=6):
    g = gen(seed)
    s = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (b,), generator=g)
    f_s = torch.randn(b, c, 3, 3, generator=g, dtype=torch.float64).relu()
    f_t = torch.randn(b, c, 2, 2, generator=g, dtype=torch.float64).relu()
    return s, t, y, f_s, f_t


def reads(f):
    """DisWOT†'s per-model features [pre-pool map, classifier input]; here the classifier's
    input is the map's global average pool, as in a plain CNN."""
    return [f, f.mean(dim=(2, 3))]


@pytest.mark.parametrize("w_sem,w_rel", [(30.0, 3000.0), (0.0, 5.0), (2.0, 0.0)])
def test_diswot_distill_matches_numpy(w_sem, w_rel):
    s, t, y, f_s, f_t = loss_inputs()
    obj = DisWOTDistill(temperature=4.0, ce_weight=0.1, kd_weight=0.9, semantic_weight=w_sem,
                        relation_weight=w_rel)
    out = obj(s, t, y, None, s_feats=reads(f_s), t_feats=reads(f_t))
    sn, tn, yn, fsn, ftn = (a.numpy() for a in (s, t, y, f_s, f_t))
    T = 4.0
    ce = -np.mean(np_log_softmax(sn)[np.arange(len(yn)), yn])
    ls, lt = np_log_softmax(sn / T), np_log_softmax(tn / T)
    kd = T * T * np.mean((np.exp(lt) * (lt - ls)).sum(1))
    d_sem = np_sem(np_fc_grad(tn, ftn.mean(axis=(2, 3)), yn),
                   np_fc_grad(sn, fsn.mean(axis=(2, 3)), yn))
    d_rel = np_rel(ftn, fsn)
    expected = 0.1 * ce + 0.9 * kd + w_sem * d_sem + w_rel * d_rel
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-10)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-10)
    assert float(out["kd"]) == pytest.approx(kd, rel=1e-10)
    assert ("d_sem" in out) == (w_sem > 0) and ("d_rel" in out) == (w_rel > 0)
    if w_sem:
        assert float(out["d_sem"]) == pytest.approx(d_sem, rel=1e-10)
    if w_rel:
        assert float(out["d_rel"]) == pytest.approx(d_rel, rel=1e-10)
    # logits only (the logit-only contract): the KD part alone
    alone = obj(s, t, y)
    assert set(alone) == {"loss", "ce", "kd"}
    assert float(alone["loss"]) == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-10)


def test_diswot_distill_distances_stay_float32_under_bf16_autocast():
    s, t, y, f_s, f_t = (v.float() if v.is_floating_point() else v for v in loss_inputs())
    obj = DisWOTDistill()
    plain = obj(s, t, y, None, s_feats=reads(f_s), t_feats=reads(f_t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = obj(s, t, y, None, s_feats=reads(f_s), t_feats=reads(f_t))
    for k in ("d_sem", "d_rel", "loss"):
        assert auto[k].dtype == torch.float32
        assert float(auto[k]) == pytest.approx(float(plain[k]), rel=1e-6)


def test_diswot_distill_gradients_reach_only_the_student():
    s, t, y, f_s, f_t = loss_inputs()
    for v in (s, t, f_s, f_t):
        v.requires_grad_(True)
    out = DisWOTDistill()(s, t, y, None, s_feats=reads(f_s), t_feats=reads(f_t))
    out["loss"].backward()
    assert t.grad is None and f_t.grad is None
    assert s.grad is not None and f_s.grad is not None and float(f_s.grad.abs().sum()) > 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the distance terms alone also send a gradient into the student's logits (via G_s)
    s.grad = None
    sem_only = DisWOTDistill(ce_weight=0, kd_weight=0, relation_weight=0)
    sem_only(s, t, y, None, s_feats=reads(f_s), t_feats=reads(f_t))["loss"].backward()
    assert float(s.grad.abs().sum()) > 0


def test_diswot_distill_options_and_width_check():
    with pytest.raises(UserError) as err:
        build_objective(make_cfg(["loss=diswot", "loss.relation_weight=-1"]).loss)
    assert err.value.key == "loss.relation_weight"
    with pytest.raises(UserError):
        DisWOTDistill(temperature=0)
    obj = build_objective(make_cfg(["loss=diswot"]).loss)
    assert (obj.temperature, obj.ce_weight, obj.kd_weight) == (4.0, 0.1, 0.9)
    assert obj.reads == "prepool" and isinstance(obj, StepObjective)
    cfg = make_cfg(DIGITS + ["teacher=cnn", "student=mlp", "loss=diswot"])
    data = build_data(cfg.dataset)
    teacher = build_model(cfg.teacher, "teacher", data).eval()
    student = build_model(cfg.student, "student", data)
    small = build_model(make_cfg(DIGITS + ["student=mlp", "student.hidden=[32]"]).student,
                        "student", data)
    with pytest.raises(UserError) as err:   # width 32 vs the cnn teacher's 128
        build_objective(cfg.loss).bind(small, teacher, data)
    assert err.value.key == "loss.semantic_weight"
    no_sem = DisWOTDistill(semantic_weight=0)
    no_sem.bind(small, teacher, data)          # relation only: any widths
    # it taps the pooled maps (mlp: its last hidden layer) and the classifiers' inputs
    assert [f.paths for f in no_sem._feats] == [["hidden.0"], ["stage3"]]
    build_objective(cfg.loss).bind(student, teacher, data)   # mlp 256/128 vs cnn: 128 == 128
    assert list(no_sem.state_dict()) == [] and list(no_sem.parameters()) == []


DISTIL = ["teacher=resnet8", "student=resnet8", "loss=diswot"]


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_diswot_distill_end_to_end_and_bit_exact_resume(tmp_path, digits_teacher):
    base = DIGITS + DISTIL + [f"teacher.checkpoint={digits_teacher}"]
    full = tmp_path / "full"
    summary = run(make_cfg(base), full, tty=False)
    assert summary["status"] == "finished" and summary["best/test/acc1"] > 30.0  # chance 10%
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "train/ce", "train/kd", "train/d_sem", "train/d_rel"):
        assert key in rows[0], key
    assert all(0 < r["train/d_sem"] < 1 and 0 < r["train/d_rel"] < 1 for r in rows)
    best = torch.load(full / "checkpoints" / "best.pt", weights_only=True)
    student_keys = set(build_model(make_cfg(base).student, "student",
                                   build_data(make_cfg(base).dataset)).state_dict())
    assert set(best["model"]) == student_keys      # nothing of the objective in the student
    assert "objective" in best                     # (DisWOT† has no heads: its state is empty)

    parted = tmp_path / "parted"
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=7"]), parted, tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), parted, tty=False)
    a, b = _weights(full), _weights(parted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
