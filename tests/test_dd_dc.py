"""DC / DSA gradient matching (dataset distillation, METHODS_FAMILIES C1 / C2): the distances
against float64 references written from the formulas, their identities, where the gradient goes,
the authors' outer/inner loop mapped onto engine steps, determinism in (seed, step), bit-exact
resume through a real checkpoint file, BatchNorm freezing and Siamese augmentation. Shapes are
sklearn digits': 1x8x8, 10 classes."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distill_cli.data.bundle import Batch
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill.methods.dc import (
    GradientMatching,
    gradient_distance,
)
from distill_cli.tasks.dataset_distill.nets import build_net
from distill_cli.tasks.dataset_distill.synthetic import SyntheticSet

SHAPE, CLASSES, IPC = (1, 8, 8), 10, 2
NET = {"arch": "convnet", "width": 16, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}
DSA_ON = "color_crop_cutout_scale_rotate"
DATA = SimpleNamespace(num_classes=CLASSES, input_shape=SHAPE)


def ctx(step: int) -> StepContext:
    return StepContext(epoch=1, step=step, steps_per_epoch=100, total_steps=100)


def make_set(seed: int = 0, ipc: int = IPC) -> SyntheticSet:
    s = SyntheticSet(CLASSES, ipc, SHAPE)
    with torch.no_grad():
        s.images.copy_(torch.randn(s.images.shape, generator=torch.Generator().manual_seed(seed)))
    return s


def make_batch(per_class: int = 6, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    return Batch(torch.arange(len(y)), torch.randn(len(y), *SHAPE, generator=g), y)


def make(student=None, net=NET, **kw) -> GradientMatching:
    obj = GradientMatching(net=net, seed=kw.pop("seed", 7), **kw)
    obj.bind(student if student is not None else make_set(), None, DATA)
    return obj


def engine_step(obj, student, opt, batch, step):
    """What the engine does with a StepObjective: terms, backward, optimizer step, after_step."""
    terms = obj.step_terms(student, None, batch, ctx(step))
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    obj.after_step(terms, ctx(step))
    return terms["loss"].detach()


def sgd(student):
    # DC's image optimizer: SGD lr 0.1, momentum 0.5 (main.py:100)
    return torch.optim.SGD(student.optimizer_groups(), lr=0.1, momentum=0.5)


# ------------------------------------------------------------------ the distances
GRAD_SHAPES = [(6, 3, 3, 3), (6,), (6,), (4, 5, 2), (10, 24), (10,)]


def grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in GRAD_SHAPES]


def ref_ours(g_syn, g_real) -> float:
    """Written from the formula: per tensor of rank >= 2, rows = first axis, explicit cosines."""
    total = 0.0
    for s, r in zip(g_syn, g_real):
        if r.dim() < 2:
            continue   # biases and norm scales contribute 0
        s64, r64 = s.double().reshape(s.shape[0], -1), r.double().reshape(r.shape[0], -1)
        for o in range(s64.shape[0]):
            a, b = s64[o].tolist(), r64[o].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
            total += 1 - dot / (na * nb + 1e-6)
    return total


def flat(gs) -> list[float]:
    return [v for g in gs for v in g.double().reshape(-1).tolist()]


def test_ours_distance_matches_float64_reference():
    gs, gr = grads(0), grads(1)
    got = float(gradient_distance(gs, gr, "ours"))
    want = ref_ours(gs, gr)
    assert want > 1.0
    assert got == pytest.approx(want, rel=1e-5)


def test_ours_ignores_rank_one_tensors_and_is_row_wise():
    gs, gr = grads(0), grads(1)
    base = float(gradient_distance(gs, gr, "ours"))
    moved = [g * 5 + 3 if g.dim() == 1 else g for g in gs]   # biases / norm scales only
    assert float(gradient_distance(moved, gr, "ours")) == pytest.approx(base, rel=1e-6)
    # scaling each ROW of a matrix by its own positive factor changes no row cosine, though it
    # changes the global cosine ('cos') of the concatenated vectors
    rows = torch.arange(1, 11, dtype=torch.float32)[:, None]
    per_row = [g * rows if g.shape == (10, 24) else g for g in gs]
    assert float(gradient_distance(per_row, gr, "ours")) == pytest.approx(base, rel=1e-5)
    assert abs(float(gradient_distance(per_row, gr, "cos"))
               - float(gradient_distance(gs, gr, "cos"))) > 1e-3


def test_mse_and_cos_match_float64_references():
    gs, gr = grads(2), grads(3)
    a, b = flat(gs), flat(gr)
    mse = sum((x - y) ** 2 for x, y in zip(a, b))
    cos = 1 - sum(x * y for x, y in zip(a, b)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + 1e-6)
    assert float(gradient_distance(gs, gr, "mse")) == pytest.approx(mse, rel=1e-5)
    assert float(gradient_distance(gs, gr, "cos")) == pytest.approx(cos, rel=1e-5, abs=1e-6)


def test_identities_zero_distance_and_scale_invariance():
    g = grads(4)
    for metric in ("ours", "cos"):
        assert abs(float(gradient_distance(g, g, metric))) < 1e-4
        assert abs(float(gradient_distance(g, [3 * t for t in g], metric))) < 1e-4
    assert float(gradient_distance(g, g, "mse")) == 0.0
    assert float(gradient_distance(g, [3 * t for t in g], "mse")) > 1.0   # mse is not invariant
    opposite = [-t for t in g]   # every row anti-parallel: 2 per row of every rank>=2 tensor
    rows = sum(t.shape[0] for t in g if t.dim() >= 2)
    assert float(gradient_distance(g, opposite, "ours")) == pytest.approx(2 * rows, rel=1e-5)


# ------------------------------------------------------------------ the objective
def test_loss_is_the_class_sum_of_distances_of_the_iterations_network():
    """Recompute step 3's loss by hand (DC mode, float64): the net of iteration 0 (steps 0..4
    share it when outer_loop=5, inner_loop=0 keeps it unchanged), per class CE gradients."""
    student, batch = make_set(), make_batch()
    obj = make(student, outer_loop=5, inner_loop=0)
    opt = sgd(student)
    for step in range(3):
        engine_step(obj, student, opt, batch, step)
    got = float(obj.step_terms(student, None, batch, ctx(3))["loss"].detach())
    net = build_net(NET, SHAPE, CLASSES, seed=derive_seed("dc-net", 7, 0)).double()
    params = list(net.parameters())
    want = 0.0
    def grad_of(x, c):
        loss = torch.nn.functional.cross_entropy(net(x.double()), torch.full((len(x),), c))
        return torch.autograd.grad(loss, params)

    for c in range(CLASSES):
        want += ref_ours(grad_of(student.class_images(c).detach(), c),
                         grad_of(batch.x[batch.y == c], c))
    assert want > 1.0
    assert got == pytest.approx(want, rel=1e-4)


def test_gradient_reaches_every_class_of_images_and_nothing_else_is_optimised():
    student, batch = make_set(), make_batch()
    obj = make(student, outer_loop=2, inner_loop=1)
    assert list(obj.parameters()) == []   # the network is not the engine's to optimise
    loss = obj.step_terms(student, None, batch, ctx(0))["loss"]
    loss.backward()
    g = student.images.grad
    assert g is not None and torch.isfinite(g).all()
    for c in range(CLASSES):
        assert g[c * IPC:(c + 1) * IPC].abs().sum() > 0, c
    assert set(obj.state_dict()) == {"_extra_state"}


@pytest.mark.parametrize("distance,ratio", [("ours", 0.97), ("mse", 0.6)])
def test_loss_decreases_over_updates_on_digits(distance, ratio):
    """A behaviour check on real sklearn digits: 20 SGD updates of the images (momentum 0.5)
    against one network (outer_loop 20, no inner training) shrink the gradient distance. On
    8x8 digits the images' gradient is large (|grad| ~ 2x |images|), so the lr is 0.03 here,
    not the authors' CIFAR 0.1; 'ours' (row cosines) falls slowly, as in the authors' runs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:20] for c in range(CLASSES)])
    batch = Batch(keep, x[keep], y[keep])
    student = make_set(seed=3, ipc=1)
    obj = make(student, outer_loop=20, inner_loop=0, distance=distance)
    opt = torch.optim.SGD(student.optimizer_groups(), lr=0.03, momentum=0.5)
    losses = [float(engine_step(obj, student, opt, batch, s)) for s in range(20)]
    assert sum(losses[-5:]) < ratio * sum(losses[:5]), losses


def test_network_lives_an_iteration_and_trains_between_updates():
    student, batch = make_set(), make_batch()
    obj = make(student, outer_loop=3, inner_loop=2)
    opt = sgd(student)
    engine_step(obj, student, opt, batch, 0)
    net = obj._net[0]
    fresh = build_net(NET, SHAPE, CLASSES, seed=derive_seed("dc-net", 7, 0))
    w = dict(net.named_parameters())
    changed = [k for k, v in fresh.named_parameters() if not torch.equal(v, w[k])]
    assert changed, "the inner loop trained the network after update 0"
    assert all(p.grad is None for p in net.parameters())   # nothing left for the next step
    engine_step(obj, student, opt, batch, 1)
    assert obj._net[0] is net                                # same iteration, same network
    engine_step(obj, student, opt, batch, 2)                 # the iteration's last update
    assert obj._net == [] and obj.get_extra_state() == {}   # nothing to checkpoint between


def test_authors_loops_by_ipc_and_refusals():
    assert (make(make_set(ipc=1)).outer_loop, make(make_set(ipc=1)).inner_loop) == (1, 1)
    obj = make(make_set(ipc=10))
    assert (obj.outer_loop, obj.inner_loop) == (10, 50)
    obj = make(make_set(ipc=3), outer_loop=4, inner_loop=0)
    assert (obj.outer_loop, obj.inner_loop) == (4, 0)
    with pytest.raises(UserError) as e:
        make(make_set(ipc=3))
    assert e.value.key == "loss.outer_loop" and "ipc=3" in e.value.what
    for kw, key in (({"distance": "l2"}, "loss.distance"), ({"outer_loop": 0}, "loss.outer_loop"),
                    ({"inner_loop": -1}, "loss.inner_loop"), ({"inner_loop": "x"}, "loss.inner_loop"),
                    ({"lr_net": 0}, "loss.lr_net"), ({"batch_train": 0}, "loss.batch_train"),
                    ({"dsa_strategy": "color_warp"}, "loss.dsa_strategy")):
        with pytest.raises(UserError) as e:
            GradientMatching(net=NET, **kw)
        assert e.value.key == key and e.value.fix


def test_same_seed_and_step_same_loss_bit_for_bit_other_step_other_loss():
    batch = make_batch()
    for strategy in ("", DSA_ON):
        def loss_at(step, seed=7, strategy=strategy):
            student = make_set()
            obj = make(student, seed=seed, outer_loop=2, inner_loop=1, dsa_strategy=strategy)
            return obj.step_terms(student, None, batch, ctx(step))["loss"].detach()
        a, b = loss_at(4), loss_at(4)
        assert torch.equal(a, b)
        assert not torch.equal(a, loss_at(6))          # another iteration: another network
        assert not torch.equal(a, loss_at(4, seed=8))  # another seed


@pytest.mark.parametrize("strategy", ["", DSA_ON])
def test_resume_from_checkpoint_file_is_bit_exact(tmp_path, strategy):
    """k steps, checkpoint (objective + set + optimizer through torch.save / weights_only load),
    fresh objects, the next steps equal the uninterrupted run's bit for bit — resumed inside an
    iteration (its network carried) and across the next iteration's start."""
    batch = make_batch()
    kw = {"outer_loop": 3, "inner_loop": 2, "dsa_strategy": strategy}

    student = make_set()
    obj, opt = make(student, **kw), sgd(student)
    straight = [engine_step(obj, student, opt, batch, s) for s in range(6)]
    final = student.images.detach().clone()

    student = make_set()
    obj, opt = make(student, **kw), sgd(student)
    for s in range(4):   # stops after update 1 of iteration 1: its network is live
        engine_step(obj, student, opt, batch, s)
    path = tmp_path / "last.pt"
    torch.save({"objective": obj.state_dict(), "model": student.state_dict(),
                "optimizer": opt.state_dict()}, path)
    del obj, opt, student

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["objective"]["_extra_state"]["iteration"] == 1
    student = make_set(seed=99)   # a fresh set, overwritten by the checkpoint
    obj = make(student, **kw)
    student.load_state_dict(ckpt["model"])
    obj.load_state_dict(ckpt["objective"])
    opt = sgd(student)
    opt.load_state_dict(ckpt["optimizer"])
    resumed = [engine_step(obj, student, opt, batch, s) for s in range(4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[4:])), (resumed, straight)
    assert torch.equal(student.images.detach(), final)


def test_resume_with_another_outer_loop_is_refused():
    student, batch = make_set(), make_batch()
    obj, opt = make(student, outer_loop=3, inner_loop=1), sgd(student)
    engine_step(obj, student, opt, batch, 0)
    state = obj.state_dict()
    other = make(make_set(), outer_loop=4, inner_loop=1)
    other.load_state_dict(state)
    with pytest.raises(UserError) as e:
        other.step_terms(student, None, batch, ctx(1))
    assert e.value.key == "loss.outer_loop"
    # a checkpoint between iterations (no network) resumed inside one: refused alike
    engine_step(obj, student, opt, batch, 1)
    engine_step(obj, student, opt, batch, 2)
    assert obj.get_extra_state() == {}
    other = make(make_set(), outer_loop=2, inner_loop=1)
    other.load_state_dict(obj.state_dict())
    with pytest.raises(UserError) as e:
        other.step_terms(student, None, batch, ctx(3))
    assert e.value.key == "loss.outer_loop"


# ------------------------------------------------------------------ DSA and BatchNorm
def test_dsa_applies_one_transform_to_real_and_synthetic():
    """Siamese: the real class batch holding the synthetic images themselves comes out of the
    augmentation equal to the augmented synthetic images, row for row; and the transform is not
    the identity. With real == synthetic the class gradients then coincide: mse loss 0."""
    student = make_set()
    obj = make(student, outer_loop=1, inner_loop=0, dsa_strategy=DSA_ON, distance="mse")
    moved = False
    for step in range(6):
        for c in range(CLASSES):
            syn = student.class_images(c).detach()
            real = torch.cat([syn, syn.flip(0)])
            a_real, a_syn = obj.siamese(real, syn, step, c)
            assert torch.equal(a_real[:IPC], a_syn)
            assert torch.equal(a_real[IPC:], a_syn.flip(0))
            moved |= not torch.equal(a_syn, syn)
    assert moved
    same = Batch(torch.arange(CLASSES * IPC), student.images.detach().clone(), student.labels)
    for step in range(4):
        assert float(obj.step_terms(student, None, same, ctx(step))["loss"].detach()) < 1e-10


def test_batchnorm_net_statistics_frozen_for_matching_then_trained():
    bn = dict(NET, norm="batchnorm")
    student, batch = make_set(), make_batch()
    obj = make(student, net=bn, outer_loop=2, inner_loop=1)
    opt = sgd(student)
    terms = obj.step_terms(student, None, batch, ctx(0))
    net = obj._net[0]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms)          # frozen while matching
    assert all(m.running_mean.abs().sum() > 0 for m in norms)    # from the real images
    stats = [m.running_mean.clone() for m in norms]
    assert torch.isfinite(terms["loss"])
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))  # matching kept them
    obj.after_step(terms, ctx(0))
    assert all(m.training for m in norms)                        # the inner loop trains them
    assert not all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))


# ------------------------------------------------------------------ through the runner
def dd_run(run_dir, *overrides):
    from conftest import make_cfg

    from distill_cli.training.run import run

    run(make_cfg(["recipe=dd_digits", "logger=none", "task.eval.models=1",
                  "task.eval.val_models=1", "task.eval.epochs=1", *overrides]), run_dir,
        tty=False)


def test_runner_resume_inside_an_iteration_is_bit_exact(tmp_path):
    """loss=dsa through the engine: 2 epochs x 2 updates straight, versus 1 epoch then a fork
    of its last.pt to 2 epochs. outer_loop 3: the checkpoint after step 1 falls inside
    iteration 0, so its network (trained by the inner loop) must come back from the file."""
    common = ["loss=dsa", "student.ipc=1", "loss.outer_loop=3", "loss.inner_loop=1",
              "task.iterations=2"]
    dd_run(tmp_path / "straight", *common, "trainer.epochs=2")
    dd_run(tmp_path / "first", *common, "trainer.epochs=1")
    first = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)
    assert first["objective"]["_extra_state"]["iteration"] == 0
    dd_run(tmp_path / "fork", *common, "trainer.epochs=2",
           f"trainer.resume={tmp_path / 'first/checkpoints/last.pt'}")
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "fork/checkpoints/last.pt", weights_only=True)
    assert torch.equal(a["model"]["images"], b["model"]["images"])
    assert not torch.equal(a["model"]["images"], first["model"]["images"])


def test_runner_refuses_an_ipc_without_the_authors_loops(tmp_path):
    with pytest.raises(UserError) as e:
        dd_run(tmp_path / "r", "loss=dc", "student.ipc=3")
    assert e.value.key == "loss.outer_loop" and "loss.inner_loop" in e.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_cli_bad_dsa_strategy_exits_2_naming_the_key(tmp_path):
    from test_cli import distill

    proc = distill("recipe=dd_digits", "logger=none", "loss=dsa", "loss.dsa_strategy=color_warp",
                   f"hydra.run.dir={tmp_path}/run", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "loss.dsa_strategy" in proc.stderr and "warp" in proc.stderr
    assert "Traceback" not in proc.stderr
