"""Multi-teacher KD (DistillNearest/DistillWeighted-inspired): the objective vs float64 NumPy for
given weights, the three weightings, and end-to-end pools on digits — `nearest` picks the trained
teacher over an untrained one, a teacher from another task gets a nearest-class-mean head, and the
scores and weights land in the summary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_cli.errors import UserError
from distill_cli.training.run import run
from distill_cli.losses.kd import KD
from distill_cli.losses.multi_teacher import MultiTeacher
from distill_cli.models import create

from conftest import DIGITS, make_cfg

K, B, NC = 3, 8, 5
MT = DIGITS + ["student=mlp", "loss=multi_teacher"]


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, NC, generator=g, dtype=torch.float64) * 2
    t = torch.randn(K, B, NC, generator=g, dtype=torch.float64) * 3
    return s, t, torch.randint(0, NC, (B,), generator=g)


def np_log_softmax(z, axis=-1):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def np_multi_teacher(s, t, y, w, T, ce_w, kd_w):
    q = np.einsum("k,kbc->bc", w, np.exp(np_log_softmax(t / T)))
    log_ps = np_log_softmax(s / T)
    kd = T * T * np.mean((q * (np.log(q) - log_ps)).sum(axis=1))
    ce = -np.mean(np_log_softmax(s)[np.arange(len(y)), y])
    return {"loss": ce_w * ce + kd_w * kd, "ce": ce, "kd": kd}


@pytest.mark.parametrize("w", [(0.2, 0.5, 0.3), (1.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3)])
def test_objective_matches_numpy_for_given_weights(w):
    s, t, y = data(1)
    obj = MultiTeacher(temperature=3.0, ce_weight=0.3, kd_weight=0.7)
    obj.teacher_weights = torch.tensor(w, dtype=torch.float64)
    got = obj(s, t, y)
    for k, v in np_multi_teacher(s.numpy(), t.numpy(), y.numpy(), np.array(w), 3.0, 0.3,
                                 0.7).items():
        assert float(got[k]) == pytest.approx(v, rel=1e-10), k


def test_weightings():
    scores = torch.tensor([0.9, 0.95, 0.5])
    mean = MultiTeacher(weights="mean").weights_from_scores(scores)
    assert torch.allclose(mean, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert MultiTeacher(weights="nearest").weights_from_scores(scores).tolist() == [0, 1, 0]
    sim = MultiTeacher(weights="similarity", tau=0.1).weights_from_scores(scores).numpy()
    want = np.exp(scores.double().numpy() / 0.1)
    np.testing.assert_allclose(sim, want / want.sum(), rtol=1e-12)
    # mean weighting = equal weights = the default without scores
    s, t, y = data(2)
    obj = MultiTeacher(weights="mean")
    unset = obj(s, t, y)["loss"]
    obj.set_scores(scores)
    assert float(obj(s, t, y)["loss"]) == pytest.approx(float(unset), rel=1e-6)


def test_one_teacher_is_hinton_kd():
    s, t, y = data(3)
    got = MultiTeacher(temperature=4.0)(s, t[0], y)     # [B, C]: one teacher
    want = KD(temperature=4.0, ce_weight=0.1, kd_weight=0.9)(s, t[0], y)
    for k in ("loss", "ce", "kd"):
        assert torch.allclose(got[k], want[k], rtol=1e-12), k


def test_bad_options_and_pools_are_user_errors(tmp_path, digits_teacher):
    with pytest.raises(UserError):
        MultiTeacher(weights="best")
    with pytest.raises(UserError) as info:
        run(make_cfg(MT), tmp_path / "a", tty=False)
    assert info.value.key == "teachers"
    with pytest.raises(UserError) as info:   # a pool for a single-teacher loss
        run(make_cfg(DIGITS + ["student=mlp", "loss=kd", "teacher=resnet8",
                               f"teacher.checkpoint={digits_teacher}",
                               f"teachers=[{{arch: resnet8, checkpoint: {digits_teacher}}}]"]),
            tmp_path / "b", tty=False)
    assert info.value.key == "teachers"
    with pytest.raises(UserError) as info:   # the entry's own error names the entry
        run(make_cfg(MT + [f"teachers=[{{arch: resnet8, checkpoint: {tmp_path}/nope.pt}}]"]),
            tmp_path / "c", tty=False)
    assert info.value.key == "teachers[0].checkpoint"


@pytest.fixture(scope="module")
def untrained_teacher(digits_teacher, tmp_path_factory):
    """The digits teacher's checkpoint with freshly initialised resnet8 weights."""
    ckpt = torch.load(digits_teacher, weights_only=True)
    torch.manual_seed(123)
    ckpt["model"] = create("resnet8", num_classes=10, in_channels=1,
                           input_size=(8, 8)).state_dict()
    path = tmp_path_factory.mktemp("untrained") / "best.pt"
    torch.save(ckpt, path)
    return path


def test_nearest_picks_the_trained_teacher(tmp_path, digits_teacher, untrained_teacher):
    pool = (f"teachers=[{{arch: resnet8, checkpoint: {untrained_teacher}}}, "
            f"{{arch: resnet8, checkpoint: {digits_teacher}}}]")
    summary = run(make_cfg(MT + [pool, "loss.weights=nearest"]), tmp_path / "n", tty=False)
    scores = summary["teachers/scores"]
    assert scores[1] > 0.9 > scores[0]            # trained vs chance-level (10 classes)
    assert summary["teachers/weights"] == [0.0, 1.0]
    assert summary["teachers/1/test/acc1"] > summary["teachers/0/test/acc1"]
    assert summary["best/test/acc1"] > 50
    ckpt = torch.load(tmp_path / "n" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["objective"]["teacher_weights"].tolist() == [0.0, 1.0]

    summary = run(make_cfg(MT + [pool, "loss.weights=similarity", "loss.tau=0.05"]),
                  tmp_path / "s", tty=False)
    w = np.exp(np.array(summary["teachers/scores"]) / 0.05)
    np.testing.assert_allclose(summary["teachers/weights"], w / w.sum(), rtol=1e-6)


def test_teacher_from_another_task_gets_a_nearest_class_mean_head(tmp_path, digits_teacher):
    other = tmp_path / "other"     # an MLP trained on a 7-class task of the same input shape
    run(make_cfg(DIGITS + ["dataset=fake", "dataset.num_classes=7", "dataset.shape=[1,8,8]",
                           "student=mlp", "loss=ce", "trainer.epochs=1"]), other, tty=False)
    pool = (f"teachers=[{{arch: mlp, checkpoint: {other}/checkpoints/best.pt}}, "
            f"{{arch: resnet8, checkpoint: {digits_teacher}}}]")
    summary = run(make_cfg(MT + [pool, "loss.weights=nearest"]), tmp_path / "mt", tty=False)
    assert summary["status"] == "finished"
    assert summary["teachers/entries"][0]["head"] == "ncm"
    assert "head" not in summary["teachers/entries"][1]
    assert all(0.0 <= a <= 1.0 for a in summary["teachers/scores"])
    assert summary["teachers/weights"] == [0.0, 1.0]  # the same-task trained teacher is nearer
    assert 0 <= summary["teachers/0/test/acc1"] <= 100  # the NCM head predicts digits classes


def test_stored_pool_outputs_end_with_the_live_runs_weights(tmp_path, digits_teacher):
    """Each pool member's outputs come from the output store (keyed like a single teacher's;
    the NCM-headed other-task member keyed apart) and the run ends bit-identical to the live
    run; a second run serves every table from the store."""
    other = tmp_path / "other"
    run(make_cfg(DIGITS + ["dataset=fake", "dataset.num_classes=7", "dataset.shape=[1,8,8]",
                           "student=mlp", "loss=ce", "trainer.epochs=1"]), other, tty=False)
    pool = (f"teachers=[{{arch: mlp, checkpoint: {other}/checkpoints/best.pt}}, "
            f"{{arch: resnet8, checkpoint: {digits_teacher}}}]")
    live = run(make_cfg(MT + [pool, "teacher.outputs=live"]), tmp_path / "live", tty=False)
    stored = run(make_cfg(MT + [pool, "teacher.outputs=store"]), tmp_path / "stored", tty=False)
    assert live["teacher/outputs"] == "live" and stored["teacher/outputs"] == "stored"
    keys = stored["teacher/outputs_key"]
    assert len(keys) == 2 and keys[0] != keys[1]
    a = torch.load(tmp_path / "live/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stored/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for i in (0, 1):
        assert live[f"teachers/{i}/test/acc1"] == stored[f"teachers/{i}/test/acc1"]
    again = run(make_cfg(MT + [pool, "teacher.outputs=store", "seed=1"]), tmp_path / "again",
                tty=False)
    assert again["teacher/outputs_hit_rate"] == 1.0


def test_a_pool_entry_is_the_same_stored_teacher_as_the_teacher_group():
    """`{arch: cnn}` in `teachers` gets the zoo's defaults for cnn (e.g. dropout), so the teacher
    store key equals `teacher=cnn`'s: a pool reuses the teachers single-teacher runs trained."""
    from distill_cli.config.build import build_data
    from distill_cli.teachers.store import content_key
    from distill_cli.teachers.pool import entry_node
    from distill_cli.teachers.build import teacher_description

    single = make_cfg(DIGITS + ["teacher=cnn", "loss=kd", "teacher.seed=3"])
    pool = make_cfg(MT + ["teachers=[{arch: cnn, seed: 3}, {arch: cnn, seed: 4, dropout: 0.1}]"])
    data = build_data(single.dataset)
    keys = [content_key(teacher_description(entry_node(pool.teacher, e, i), data, "32"))
            for i, e in enumerate(pool.teachers)]
    assert keys[0] == content_key(teacher_description(single.teacher, data, "32"))
    assert keys[1] != keys[0]
    assert entry_node(pool.teacher, pool.teachers[1], 1).dropout == 0.1   # the entry wins
