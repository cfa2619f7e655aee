"""DM and DataDAM (dataset distillation, METHODS_FAMILIES C3 / C5): the matching losses against
float64 references written from the formulas, their identities, where gradients go, and
determinism in (seed, step). Shapes are sklearn digits': 1x8x8, 10 classes."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distill_cli.data.bundle import Batch
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill.methods.datadam import (
    DataDAM,
    activation_modules,
    attention_map,
)
from distill_cli.tasks.dataset_distill.methods.dm import DM
from distill_cli.tasks.dataset_distill.nets import build_net
from distill_cli.tasks.dataset_distill.synthetic import SyntheticSet

SHAPE, CLASSES, IPC = (1, 8, 8), 10, 3
NET = {"arch": "convnet", "width": 16, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}
DSA_ON = "color_crop_cutout_scale_rotate"
DATA = SimpleNamespace(num_classes=CLASSES, input_shape=SHAPE)


def num(t: torch.Tensor) -> float:
    return t.detach().item()


def ctx(step: int) -> StepContext:
    return StepContext(epoch=1, step=step, steps_per_epoch=10, total_steps=10)


def make_set(seed: int = 0) -> SyntheticSet:
    s = SyntheticSet(CLASSES, IPC, SHAPE)
    with torch.no_grad():
        s.images.copy_(torch.randn(s.images.shape, generator=torch.Generator().manual_seed(seed)))
    return s


def make_batch(per_class=(5, 4, 6, 5, 5, 3, 5, 5, 7, 5), seed: int = 1) -> Batch:
    """A class-ordered real batch; classes of unequal size (a class short of images)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    return Batch(torch.arange(len(y)), torch.randn(len(y), *SHAPE, generator=g), y)


def bound(cls, **kw):
    obj = cls(net=NET, seed=kw.pop("seed", 7), **kw)
    obj.bind(make_set(), None, DATA)
    return obj


def ref_net(method: str, seed: int, step: int) -> nn.Module:
    """The network of update `step`, rebuilt by hand, in float64."""
    return build_net(NET, SHAPE, CLASSES, seed=derive_seed(f"{method}-net", seed, step)).double()


def ref_class_gap(real: list[np.ndarray], syn: list[np.ndarray]) -> float:
    """Σ_c ‖mean real_c − mean syn_c‖² in float64 numpy, rows flattened."""
    return float(sum(((r.reshape(len(r), -1).mean(0) - s.reshape(len(s), -1).mean(0)) ** 2).sum()
                     for r, s in zip(real, syn)))


def split(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [x[y == c] for c in range(CLASSES)]


# ------------------------------------------------------------------ DM

def test_dm_loss_matches_float64_reference_from_embeddings():
    dm = bound(DM, dsa_strategy="none")
    student, batch = make_set(), make_batch()
    got = dm.step_terms(student, None, batch, ctx(3))["loss"]
    net = ref_net("dm", 7, 3)
    with torch.no_grad():
        real = [net.embed(x.double()).numpy() for x in split(batch.x, batch.y)]
        syn = [net.embed(student.class_images(c).double()).numpy() for c in range(CLASSES)]
    want = ref_class_gap(real, syn)
    assert want > 0
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("strategy", ["none", DSA_ON])
def test_dm_is_zero_when_the_synthetic_images_are_the_real_batch(strategy):
    # with DSA on, only a SIAMESE transformation (one draw for both sides) keeps it at zero
    student = make_set()
    batch = Batch(torch.arange(CLASSES * IPC), student.images.detach().clone(),
                  student.labels.clone())
    for step in range(4):   # several steps: several DSA families
        loss = bound(DM, dsa_strategy=strategy).step_terms(student, None, batch, ctx(step))["loss"]
        assert num(loss) == pytest.approx(0.0, abs=1e-9)
    other = make_batch(per_class=(IPC,) * CLASSES)
    assert num(bound(DM, dsa_strategy=strategy).step_terms(student, None, other, ctx(0))["loss"]) > 0


def test_dm_is_invariant_to_the_order_within_a_class_and_of_real_batch_size_scale():
    # a mean over the class: permuting rows of a class, or repeating the real batch, changes nothing
    dm = bound(DM, dsa_strategy="none")
    student, batch = make_set(), make_batch()
    base = dm.step_terms(student, None, batch, ctx(0))["loss"]
    perm = torch.cat([torch.nonzero(batch.y == c).flatten().flip(0) for c in range(CLASSES)])
    shuffled = Batch(batch.index[perm], batch.x[perm], batch.y[perm])
    doubled = Batch(torch.cat([batch.index] * 2), torch.cat([batch.x] * 2), torch.cat([batch.y] * 2))
    assert num(dm.step_terms(student, None, shuffled, ctx(0))["loss"]) == pytest.approx(
        num(base), rel=1e-5)
    assert num(dm.step_terms(student, None, doubled, ctx(0))["loss"]) == pytest.approx(
        num(base), rel=1e-5)


# ------------------------------------------------------------------ DataDAM

def test_attention_map_matches_float64_reference():
    feat = torch.randn(4, 5, 3, 2, generator=torch.Generator().manual_seed(0))
    f = feat.double().numpy()
    for p in (1.0, 2.0):
        a = (np.abs(f) ** p).sum(axis=1).reshape(4, -1)
        want = a / np.sqrt((a ** 2).sum(axis=1, keepdims=True))
        got = attention_map(feat, p)
        assert got.shape == (4, 6)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-7)
    # a positive per-image scale of the features does not change the map (p = 1)
    scaled = feat * torch.tensor([0.5, 2.0, 3.0, 7.0]).view(4, 1, 1, 1)
    torch.testing.assert_close(attention_map(scaled), attention_map(feat))


def ref_datadam(seed: int, step: int, real: list[torch.Tensor], syn: list[torch.Tensor]):
    """(sam over every hooked layer but the last, sam over ALL layers, mmd) in float64, running
    `net.features` module by module and reading each activation's output (no hooks)."""
    net = ref_net("datadam", seed, step)

    def taps(x):
        out, acts = x.double(), []
        for m in net.features:
            out = m(out)
            if isinstance(m, nn.ReLU):
                acts.append(out)
        return acts, out.flatten(1)

    def att(a):
        s = a.abs().sum(1).flatten(1).numpy()
        return s / np.sqrt((s ** 2).sum(1, keepdims=True))

    with torch.no_grad():
        r = [taps(x) for x in real]
        s = [taps(x) for x in syn]
        # the embedding is the flattened final features
        torch.testing.assert_close(s[0][1], net.embed(syn[0].double()))
    layers = len(r[0][0])
    per_layer = [ref_class_gap([att(a[l]) for a, _ in r], [att(a[l]) for a, _ in s])
                 for l in range(layers)]
    mmd = ref_class_gap([e.numpy() for _, e in r], [e.numpy() for _, e in s])
    return sum(per_layer[:-1]), sum(per_layer), mmd, layers


def test_datadam_terms_match_float64_reference_and_skip_the_last_layer():
    dam = bound(DataDAM, dsa_strategy="none")
    student, batch = make_set(), make_batch()
    terms = dam.step_terms(student, None, batch, ctx(2))
    sam, sam_all, mmd, layers = ref_datadam(
        7, 2, split(batch.x, batch.y), [student.class_images(c).detach() for c in range(CLASSES)])
    assert layers == NET["depth"] == len(activation_modules(ref_net("datadam", 7, 2)))
    assert num(terms["sam"]) == pytest.approx(sam, rel=1e-4)
    assert num(terms["mmd"]) == pytest.approx(mmd, rel=1e-4)
    assert abs(sam_all - sam) > 1e-3 * sam    # the last layer's term is real and left out
    assert num(terms["loss"]) == pytest.approx(100.0 * (sam + 0.01 * mmd), rel=1e-4)
    assert not terms["sam"].requires_grad and not terms["mmd"].requires_grad


def test_datadam_weights_scale_the_terms():
    student, batch = make_set(), make_batch()
    base = bound(DataDAM, dsa_strategy=DSA_ON).step_terms(student, None, batch, ctx(1))
    other = bound(DataDAM, dsa_strategy=DSA_ON, weight=3.0, task_balance=0.5).step_terms(
        student, None, batch, ctx(1))
    assert torch.equal(base["sam"], other["sam"]) and torch.equal(base["mmd"], other["mmd"])
    assert num(other["loss"]) == pytest.approx(3.0 * num(base["sam"] + 0.5 * base["mmd"]),
                                                 rel=1e-5)


def test_datadam_depth_one_net_has_no_attention_term():
    # the only hooked layer is the last one: SAM is empty, the loss is the embedding term
    obj = DataDAM(net={**NET, "depth": 1}, seed=0, dsa_strategy="none")
    obj.bind(make_set(), None, DATA)
    terms = obj.step_terms(make_set(), None, make_batch(), ctx(0))
    assert num(terms["sam"]) == 0.0 and num(terms["mmd"]) > 0
    assert num(terms["loss"]) == pytest.approx(100.0 * 0.01 * num(terms["mmd"]), rel=1e-6)


# ------------------------------------------------------------------ both

@pytest.mark.parametrize("cls", [DM, DataDAM])
def test_gradient_reaches_every_synthetic_image_and_nothing_else(cls):
    obj = bound(cls, dsa_strategy=DSA_ON)
    student, batch = make_set(), make_batch()
    batch = Batch(batch.index, batch.x.clone().requires_grad_(True), batch.y)
    params_before = list(obj.parameters())
    loss = obj.step_terms(student, None, batch, ctx(0))["loss"]
    loss.backward()
    g = student.images.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.flatten(1).abs().sum(1) > 0).all()      # every class's every image moves
    assert batch.x.grad is None                         # real features are constants
    assert student.lr is None and params_before == [] and list(obj.parameters()) == []


@pytest.mark.parametrize("cls", [DM, DataDAM])
def test_same_seed_and_step_give_the_same_loss_bit_for_bit(cls):
    student, batch = make_set(), make_batch()
    a = bound(cls, dsa_strategy=DSA_ON).step_terms(student, None, batch, ctx(5))["loss"]
    b = bound(cls, dsa_strategy=DSA_ON).step_terms(student, None, batch, ctx(5))["loss"]
    assert torch.equal(a, b)
    other_step = bound(cls, dsa_strategy=DSA_ON).step_terms(student, None, batch, ctx(6))["loss"]
    other_seed = bound(cls, dsa_strategy=DSA_ON, seed=8).step_terms(student, None, batch,
                                                                    ctx(5))["loss"]
    assert not torch.equal(a, other_step) and not torch.equal(a, other_seed)
    assert len(bound(cls).state_dict()) == 0   # nothing carried across steps


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for cls in (DM, DataDAM):
        bound(cls, dsa_strategy=DSA_ON).step_terms(make_set(), None, make_batch(), ctx(0))
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,key", [
    ({"net": None}, "loss.net"),
    ({"dsa_strategy": 3}, "loss.dsa_strategy"),
    ({"dsa_strategy": "crop_flop"}, "loss.dsa_strategy"),
    ({"weight": -1.0}, "loss.weight"),
    ({"task_balance": float("nan")}, "loss.task_balance"),
    ({"attention_p": 0}, "loss.attention_p"),
    ({"weight": True}, "loss.weight"),
])
def test_bad_options_are_user_errors(kwargs, key):
    with pytest.raises(UserError) as err:
        DataDAM(**{"net": NET, **kwargs})
    assert err.value.key == key


def test_non_image_dataset_is_a_user_error_at_bind():
    for cls in (DM, DataDAM):
        with pytest.raises(UserError) as err:
            cls(net=NET).bind(make_set(), None, SimpleNamespace(num_classes=10, input_shape=(64,)))
        assert err.value.key == "dataset"


def test_a_net_without_embed_is_a_user_error_at_bind():
    for cls in (DM, DataDAM):
        with pytest.raises(UserError) as err:
            cls(net={"arch": "mlp"}).bind(make_set(), None, DATA)
        assert err.value.key == "task.net"


# ------------------------------------------------------------------ through the runner

@pytest.mark.parametrize("loss", ["dm", "datadam"])
def test_a_run_logs_the_terms_and_resumes_bit_exactly(tmp_path, loss):
    """`recipe=dd_digits loss=<m>` for 6 set updates, once straight and once stopped after 4 and
    resumed: the same final set bit for bit (no state carried across steps, every draw seeded
    from (seed, step)), the set moved from its initialisation, the method's terms logged."""
    import json

    from conftest import make_cfg

    from distill_cli.config.build import build_data
    from distill_cli.tasks.dataset_distill.synthetic import init_set
    from distill_cli.training.run import RunInterrupted, run

    base = ["recipe=dd_digits", f"loss={loss}", "logger=none", "trainer.epochs=2",
            "task.iterations=3", "task.eval.models=1", "task.eval.epochs=1", "student.ipc=2",
            "task.net.width=8", "trainer.log_every_n_steps=1"]
    run(make_cfg(base), tmp_path / "straight", tty=False)
    with pytest.raises(RunInterrupted):
        run(make_cfg(base + ["trainer.stop_at_step=4"]), tmp_path / "resumed", tty=False)
    run(make_cfg(base + ["trainer.resume=auto"]), tmp_path / "resumed", tty=False)

    def final(name):
        return torch.load(tmp_path / name / "distilled_last.pt", weights_only=True)["images"]

    assert torch.equal(final("straight"), final("resumed"))
    cfg = make_cfg(base)
    start = init_set(build_data(cfg.dataset).train, 10, 2, "real", int(cfg.seed)).images
    assert start.shape == final("straight").shape
    assert not torch.allclose(start.detach(), final("straight"), atol=1e-4)   # the set learned
    logged = [json.loads(line) for line in
              (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert "train/loss" in keys
    if loss == "datadam":
        assert {"train/sam", "train/mmd"} <= keys
