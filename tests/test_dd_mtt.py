"""MTT (dataset distillation, METHODS_FAMILIES C4) and its stored expert trajectories (+ FTD's
GSAM experts): the normalised parameter distance and the unrolled SGD against float64
references, where gradients go, determinism in (seed, step), the experts trained once, keyed,
rebuilt bit for bit, continued after an interrupted build, shared by concurrent runs, and the
refused settings. Data: sklearn digits (1x8x8, 10 classes); tiny experts (width 16)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.data.augment import normalize
from distill_cli.data.digits import build as digits
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.runs import provenance
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill import experts as ex
from distill_cli.tasks.dataset_distill.methods.mtt import (
    TrajectoryMatching,
    normalized_distance,
    unroll,
)
from distill_cli.tasks.dataset_distill.nets import build_net, flat_params, load_flat_
from distill_cli.tasks.dataset_distill.synthetic import SyntheticSet, init_set

SHAPE, CLASSES = (1, 8, 8), 10
NET = {"arch": "convnet", "width": 16, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}
DSA_ON = "color_crop_cutout_scale_rotate"
TINY = {"num": 2, "epochs": 2, "dsa_strategy": DSA_ON}
REPO = Path(__file__).resolve().parent.parent


def ctx(step: int) -> StepContext:
    return StepContext(epoch=1, step=step, steps_per_epoch=10, total_steps=10)


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A store that holds the TINY experts (trained once for the module)."""
    path = tmp_path_factory.mktemp("store")
    ex.build_experts(path, digits(), NET, ex.ExpertRecipe.from_node(TINY), log=lambda s: None)
    return path


def objective(root, **kw) -> TrajectoryMatching:
    args = {"net": NET, "seed": 3, "store_root": str(root), "experts": TINY, "expert_epochs": 1,
            "max_start_epoch": 1, "syn_steps": 3, "dsa_strategy": DSA_ON}
    args.update(kw)
    return TrajectoryMatching(**args)


def bound(root, data, ipc: int = 2, **kw) -> tuple[TrajectoryMatching, SyntheticSet]:
    obj = objective(root, **kw)
    student = init_set(data.train, CLASSES, ipc, "real", 0)
    obj.bind(student, None, data)
    return obj, student


# ----------------------------------------------------------------------------- the loss

def test_normalized_distance_matches_a_float64_reference_and_its_identities():
    g = torch.Generator().manual_seed(0)
    end, start, target = (torch.randn(57, generator=g) for _ in range(3))
    e, s, t = (v.double().numpy() for v in (end, start, target))
    ref = np.sum((e - t) ** 2) / np.sum((s - t) ** 2)
    assert normalized_distance(end, start, target).item() == pytest.approx(ref, rel=1e-6)
    # reaching the expert's target costs nothing; staying at the start costs exactly 1
    assert normalized_distance(target, start, target).item() == 0.0
    assert normalized_distance(start, start, target).item() == pytest.approx(1.0)
    # invariant to a common scale and a common shift of parameter space
    shift = torch.randn(57, generator=g)
    moved = normalized_distance(3 * end + shift, 3 * start + shift, 3 * target + shift)
    assert moved.item() == pytest.approx(ref, rel=1e-5)


def hand_sgd(net64: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             lr: float) -> torch.Tensor:
    """One plain SGD step on a module holding `theta` (ordinary autograd on the module's own
    parameters, no functional forward), float64."""
    load_flat_(net64, theta)
    net64.zero_grad()
    F.cross_entropy(net64(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net64.parameters()])
    return theta - lr * grad


@pytest.mark.parametrize("steps,batch_syn", [(1, None), (1, 4), (2, 4)])
def test_unroll_equals_hand_computed_sgd_steps_in_float64(steps, batch_syn):
    """θ̂_{n+1} = θ̂_n − α ∇CE on the chunks the authors use: `torch.split(randperm, batch_syn)`
    popped from the end (n = 10 images, batch_syn 4: chunks of 4, 4, 2 -> the 2 go first)."""
    net = build_net(NET, SHAPE, CLASSES, seed=11).double()
    ref = build_net(NET, SHAPE, CLASSES, seed=12).double()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(10, *SHAPE, generator=g, dtype=torch.float64)
    labels = torch.arange(10) % CLASSES
    theta0 = flat_params(build_net(NET, SHAPE, CLASSES, seed=13)).detach().double()
    lr = torch.tensor(0.05, dtype=torch.float64)
    got = unroll(net, theta0.clone().requires_grad_(True), images, labels, lr, steps,
                 batch_syn, "", torch.Generator().manual_seed(99))

    perm = torch.randperm(10, generator=torch.Generator().manual_seed(99))
    chunks = list(perm.split(batch_syn or 10))
    theta = theta0
    for _ in range(steps):
        idx = chunks.pop()
        theta = hand_sgd(ref, theta, images[idx], labels[idx], 0.05).detach()
    assert torch.allclose(got.detach(), theta, rtol=1e-10, atol=1e-12)
    assert not torch.equal(theta, theta0)


# ----------------------------------------------------------------------------- the objective

def test_gradient_reaches_the_images_and_the_learnable_step_size(root, data):
    obj, student = bound(root, data)
    assert isinstance(student.lr, nn.Parameter) and student.lr.item() == pytest.approx(0.01)
    groups = student.optimizer_groups()
    assert groups[1]["params"] == [student.lr] and groups[1]["lr"] == pytest.approx(1e-5)
    terms = obj.step_terms(student, None, None, ctx(0))
    assert set(terms) == {"loss", "syn_lr"} and not terms["syn_lr"].requires_grad
    assert torch.isfinite(terms["loss"]) and terms["loss"].item() > 0
    terms["loss"].backward()
    assert student.lr.grad is not None and torch.isfinite(student.lr.grad)
    assert student.lr.grad.item() != 0
    rows = student.images.grad.flatten(1).abs().sum(1)
    assert torch.isfinite(rows).all() and (rows > 0).all()   # batch_syn=None: every image
    # the objective holds no parameters of its own (the optimizer sees only the set's)
    assert list(obj.parameters()) == []


@pytest.mark.parametrize("steps,rows", [(1, 2), (2, 5)])
def test_only_the_images_of_the_unrolled_chunks_get_gradient(root, data, steps, rows):
    """20 images, batch_syn 3: chunks 3 x 6 + 2; the authors pop the last (2) first."""
    obj, student = bound(root, data, batch_syn=3, syn_steps=steps)
    obj.step_terms(student, None, None, ctx(4))["loss"].backward()
    touched = (student.images.grad.flatten(1).abs().sum(1) > 0).sum().item()
    assert touched == rows


def test_an_update_is_a_pure_function_of_seed_and_step(root, data):
    obj, student = bound(root, data)
    first = obj.step_terms(student, None, None, ctx(7))["loss"]
    again = obj.step_terms(student, None, None, ctx(7))["loss"]
    assert torch.equal(first, again)
    other_obj, other_student = bound(root, data)
    rebuilt = other_obj.step_terms(other_student, None, None, ctx(7))["loss"]
    assert torch.equal(first, rebuilt)
    losses = {obj.step_terms(student, None, None, ctx(s))["loss"].item() for s in range(8, 11)}
    assert first.item() not in losses and len(losses) == 3


# ----------------------------------------------------------------------------- the experts

def test_experts_are_trained_once_and_reused(root, data):
    recipe = ex.ExpertRecipe.from_node(TINY)
    lines: list[str] = []
    again = ex.build_experts(root, data, NET, recipe, log=lines.append)
    assert not again.trained and "reusing" in lines[0] and len(lines) == 1
    entry = root / "experts" / again.key
    assert sorted(p.name for p in entry.iterdir()) == [
        "entry.json", "expert_0.json", "expert_0.pt", "expert_1.json", "expert_1.pt"]
    meta = json.loads((entry / "entry.json").read_text())
    assert meta["key"] == again.key and meta["num"] == 2 and meta["epochs"] == 2
    assert len(meta["test_acc1"]) == 2 and all(0 <= a <= 100 for a in meta["test_acc1"])
    params = flat_params(build_net(NET, SHAPE, CLASSES, seed=0)).numel()
    for i, traj in enumerate(again.trajectories):
        assert traj.dtype == torch.float32 and tuple(traj.shape) == (3, params)
        # row 0: the network built from the expert's documented seed
        init = flat_params(build_net(NET, SHAPE, CLASSES,
                                     seed=derive_seed("mtt-expert", i, recipe.seed)))
        assert torch.equal(traj[0], init.detach())
        assert not torch.equal(traj[1], traj[0])   # it moved
    assert not torch.equal(again.trajectories[0], again.trajectories[1])
    assert not list((root / "experts").glob(".tmp-*"))


def test_experts_record_their_machine_and_reuse_elsewhere_says_so(root, data):
    """Like a stored teacher: the entry records the kind of machine that trained the
    trajectories, and reusing them on another kind says so (other last bits there)."""
    recipe = ex.ExpertRecipe.from_node(TINY)
    lines: list[str] = []
    key = ex.build_experts(root, data, NET, recipe, log=lines.append).key
    entry_file = root / "experts" / key / "entry.json"
    meta = json.loads(entry_file.read_text())
    assert meta["machine"] == provenance.machine_kind("cpu") and lines[0].endswith("mean)")
    try:
        entry_file.write_text(json.dumps({**meta, "machine": "Some CPU (AVX2), torch 2.0.0"}))
        ex.build_experts(root, data, NET, recipe, log=lines.append)
        assert lines[1].endswith("mean on another kind of machine: Some CPU (AVX2), torch 2.0.0)")
    finally:   # the module's store is shared by the tests after this one
        entry_file.write_text(json.dumps(meta))


def test_the_key_follows_every_setting_that_changes_the_trajectories(data):
    base = ex.ExpertRecipe.from_node(TINY)

    def key(recipe=base, net=NET, dataset=data):
        return ex.content_key(ex.description(dataset, net, recipe))

    assert key() == key(ex.ExpertRecipe.from_node(dict(TINY)))   # deterministic
    changed = [ex.ExpertRecipe.from_node({**TINY, k: v}) for k, v in
               [("lr", 0.02), ("epochs", 3), ("num", 3), ("seed", 1), ("batch_size", 128),
                ("momentum", 0.9), ("dsa_strategy", ""), ("sam_rho", 0.01)]]
    keys = {key(r) for r in changed} | {key(net={**NET, "width": 8}),
                                        key(dataset=digits(limit_train=500))}
    assert key() not in keys and len(keys) == len(changed) + 2
    # GSAM's alpha/adaptive only matter when SAM is on
    assert key(ex.ExpertRecipe.from_node({**TINY, "sam_alpha": 0.1})) == key()
    on = {**TINY, "sam_rho": 0.01}
    assert key(ex.ExpertRecipe.from_node({**on, "sam_alpha": 0.1})) != \
        key(ex.ExpertRecipe.from_node(on))


def test_experts_rebuilt_from_scratch_are_identical_bit_for_bit(root, data, tmp_path):
    recipe = ex.ExpertRecipe.from_node(TINY)
    first = ex.build_experts(root, data, NET, recipe, log=lambda s: None)
    fresh = ex.build_experts(tmp_path, data, NET, recipe, log=lambda s: None)
    assert fresh.trained and fresh.key == first.key
    for a, b in zip(first.trajectories, fresh.trajectories):
        assert torch.equal(a, b)


def test_an_expert_epoch_is_sgd_over_the_documented_order_of_the_full_split(data, tmp_path):
    """Row 1 of expert 0 (no DSA): plain SGD, batches of 256 over randperm(derive_seed(
    "mtt-expert-order", seed, 0, 0)) of the WHOLE training split, the last partial batch kept."""
    recipe = ex.ExpertRecipe.from_node({"num": 1, "epochs": 1, "dsa_strategy": "", "seed": 4,
                                        "lr": 0.05})
    got = ex.build_experts(tmp_path, data, NET, recipe, log=lambda s: None).trajectories[0]
    net = build_net(NET, SHAPE, CLASSES, seed=derive_seed("mtt-expert", 0, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    split = data.train
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed("mtt-expert-order", 4, 0, 0)))
    batches = 0
    for start in range(0, n, 256):
        idx = order[start:start + 256]
        opt.zero_grad()
        F.cross_entropy(net(normalize(split.x[idx], split._mean, split._std)),
                        split.y[idx]).backward()
        opt.step()
        batches += 1
    assert batches == -(-n // 256) and n % 256 != 0
    assert torch.equal(got[1], flat_params(net).detach())


def test_an_interrupted_build_keeps_its_finished_experts(root, data, tmp_path):
    """A build killed after expert 0 leaves `.tmp-<key>/expert_0.*`: the next build keeps it,
    trains the rest, and the result equals an uninterrupted build."""
    recipe = ex.ExpertRecipe.from_node(TINY)
    full = ex.build_experts(root, data, NET, recipe, log=lambda s: None)
    staging = tmp_path / "experts" / f".tmp-{full.key}"
    staging.mkdir(parents=True)
    for name in ("expert_0.pt", "expert_0.json"):
        shutil.copy(root / "experts" / full.key / name, staging / name)
    (staging / "expert_1.pt").write_bytes(b"half a file")   # never completed: trained again
    lines: list[str] = []
    resumed = ex.build_experts(tmp_path, data, NET, recipe, log=lines.append)
    assert "kept from an interrupted build" in lines[0]
    assert "kept" not in lines[1]
    for a, b in zip(full.trajectories, resumed.trajectories):
        assert torch.equal(a, b)
    assert not staging.exists()


def test_a_damaged_entry_is_refused_naming_the_store(root, data, tmp_path):
    recipe = ex.ExpertRecipe.from_node(TINY)
    key = ex.build_experts(root, data, NET, recipe, log=lambda s: None).key
    shutil.copytree(root / "experts", tmp_path / "experts")
    (tmp_path / "experts" / key / "expert_1.pt").write_bytes(b"truncated")
    with pytest.raises(UserError) as err:
        ex.build_experts(tmp_path, data, NET, recipe, log=lambda s: None)
    assert err.value.key == "loss.store_root" and "expert_1.pt" in err.value.what
    assert str(tmp_path / "experts" / key) in err.value.fix
    (tmp_path / "experts" / key / "entry.json").write_text("{}")
    with pytest.raises(UserError, match="does not describe"):
        ex.build_experts(tmp_path, data, NET, recipe, log=lambda s: None)


def test_a_store_root_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as err:
        ex.build_experts(tmp_path / "file", data, NET, ex.ExpertRecipe.from_node(TINY),
                         log=lambda s: None)
    assert err.value.key == "loss.store_root"


BUILD = """
import sys, torch
torch.set_num_threads(1)
from distill_cli.data.digits import build
from distill_cli.tasks.dataset_distill import experts as ex
net = {"arch": "convnet", "width": 16, "depth": 3, "norm": "instancenorm", "act": "relu",
       "pool": "avgpool"}
r = ex.build_experts(sys.argv[1], build(), net, ex.ExpertRecipe.from_node(
    {"num": 2, "epochs": 3, "dsa_strategy": ""}), log=lambda s: print(s, flush=True))
print("KEY", r.key, r.trained)
"""


HOLD = """
import shutil, sys
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()              # the test says: finish "training" now
shutil.copytree(sys.argv[2], sys.argv[3])   # publish the entry, as a finished build does
lock.release()
"""


def test_a_run_waits_for_another_process_building_the_same_experts(root, data, tmp_path):
    """Another process holds the key's lock (it is training these experts): this run waits,
    then reuses what that process published instead of training them again."""
    import threading

    recipe = ex.ExpertRecipe.from_node(TINY)
    key = ex.build_experts(root, data, NET, recipe, log=lambda s: None).key
    (tmp_path / "experts").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "experts" / f"{key}.lock"),
         str(root / "experts" / key), str(tmp_path / "experts" / key)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lines: list[str] = []
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(
            ex.build_experts(tmp_path, data, NET, recipe, log=lines.append)))
        waiter.start()
        for _ in range(600):   # until it reports that it waits (at most 60 s)
            if lines:
                break
            waiter.join(0.1)
        assert lines and "waiting" in lines[0], lines
        assert waiter.is_alive()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        waiter.join(60)
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait()
    assert result and not result[0].trained
    assert not [line for line in lines if line.startswith("expert ")]   # trained nothing
    stored = ex.build_experts(root, data, NET, recipe, log=lambda s: None)
    for a, b in zip(stored.trajectories, result[0].trajectories):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_concurrent_runs_train_the_experts_once(tmp_path):
    """Two real runs started together (slow: two interpreters importing torch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    trained = [line for out in outs for line in out.splitlines() if line.startswith("expert ")]
    assert len(trained) == 2, outs   # expert 1/2 and 2/2, once in all
    flags = sorted(line.split()[-1] for out in outs for line in out.splitlines()
                   if line.startswith("KEY"))
    assert flags == ["False", "True"]
    assert len({line.split()[1] for out in outs for line in out.splitlines()
                if line.startswith("KEY")}) == 1


# ----------------------------------------------------------------------------- FTD (GSAM)

def test_gsam_step_matches_a_float64_reference():
    """FTD's experts: g = ∇L(w); e = ρ w²g/‖|w|g‖ (adaptive); g_p = ∇L(w+e);
    d = g_p − α(g − cos·‖g‖·g_p/‖g_p‖); w ← w − lr·d."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    w0 = [p.detach().clone() for p in net.parameters()]
    rho, alpha, lr = 0.05, 0.4, 0.1

    def grads(ws):
        ws = [w.clone().requires_grad_(True) for w in ws]
        out = torch.tanh(x @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return [gr.detach() for gr in torch.autograd.grad(F.cross_entropy(out, y), ws)]

    g = grads(w0)
    norm = torch.sqrt(sum(((w.abs() * gi) ** 2).sum() for w, gi in zip(w0, g)))
    e = [rho * w ** 2 * gi / norm for w, gi in zip(w0, g)]
    gp = grads([w + ei for w, ei in zip(w0, e)])
    flat_g, flat_gp = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in gp])
    cos = flat_g @ flat_gp / (flat_g.norm() * flat_gp.norm())
    want = [w - lr * (gpi - alpha * (gi - cos * flat_g.norm() * gpi / flat_gp.norm()))
            for w, gi, gpi in zip(w0, g, gp)]

    recipe = ex.ExpertRecipe(sam_rho=rho, sam_alpha=alpha, sam_adaptive=True)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    ex._gsam_step(net, list(net.parameters()), lambda: F.cross_entropy(net(x), y), opt, recipe)
    for p, w in zip(net.parameters(), want):
        assert torch.allclose(p.detach(), w, rtol=1e-10, atol=1e-12)


def test_sam_experts_differ_from_plain_ones_and_stay_finite(data, tmp_path):
    plain = ex.ExpertRecipe.from_node({"num": 1, "epochs": 1})
    flat = ex.ExpertRecipe.from_node({"num": 1, "epochs": 1, "sam_rho": 0.01})
    a = ex.build_experts(tmp_path, data, NET, plain, log=lambda s: None)
    b = ex.build_experts(tmp_path, data, NET, flat, log=lambda s: None)
    assert a.key != b.key
    assert torch.equal(a.trajectories[0][0], b.trajectories[0][0])   # same init
    assert torch.isfinite(b.trajectories[0]).all()
    assert not torch.equal(a.trajectories[0][1], b.trajectories[0][1])


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("kw,key", [
    ({"max_start_epoch": 2, "expert_epochs": 1}, "loss.max_start_epoch"),   # 2 + 1 > 2 epochs
    ({"experts": {**TINY, "epochs": 3}, "max_start_epoch": 3}, "loss.max_start_epoch"),
    ({"syn_steps": 0}, "loss.syn_steps"),
    ({"expert_epochs": 1.5}, "loss.expert_epochs"),
    ({"batch_syn": 0}, "loss.batch_syn"),
    ({"lr_teacher": 0.0}, "loss.lr_teacher"),
    ({"lr_lr": float("nan")}, "loss.lr_lr"),
    ({"dsa_strategy": "crop_blur"}, "loss.dsa_strategy"),
    ({"store_root": ""}, "loss.store_root"),
    ({"net": None}, "loss.net"),
    ({"experts": {**TINY, "lr": -1}}, "loss.experts.lr"),
    ({"experts": {**TINY, "num": 0}}, "loss.experts.num"),
    ({"experts": {**TINY, "epochs": True}}, "loss.experts.epochs"),
    ({"experts": {**TINY, "sam_rho": -0.1}}, "loss.experts.sam_rho"),
    ({"experts": {**TINY, "sam_adaptive": "yes"}}, "loss.experts.sam_adaptive"),
    ({"experts": {**TINY, "dsa_strategy": "zoom"}}, "loss.experts.dsa_strategy"),
    ({"experts": {**TINY, "rho": 0.1}}, "loss.experts.rho"),
    ({"experts": 5}, "loss.experts"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, kw, key):
    with pytest.raises(UserError) as err:
        objective(tmp_path, **kw)
    assert err.value.key == key
    assert not (tmp_path / "experts").exists()   # refused before anything is trained


def test_a_non_image_dataset_is_refused(tmp_path):
    from types import SimpleNamespace
    obj = objective(tmp_path)
    student = SyntheticSet(CLASSES, 1, (1, 40))
    with pytest.raises(UserError) as err:
        obj.bind(student, None, SimpleNamespace(input_shape=(1, 40), num_classes=CLASSES))
    assert err.value.key == "dataset"


# ----------------------------------------------------------------------------- a run

def test_a_run_learns_its_step_size_and_resumes_bit_exactly(tmp_path):
    """`loss=mtt` through the runner: the experts trained into the store, `syn_lr` logged and
    learned, and a run stopped mid-way and resumed equals the uninterrupted one (images AND lr:
    nothing is carried across steps but the set and its optimizer)."""
    from conftest import make_cfg

    from distill_cli.runs import checkpoint
    from distill_cli.training.run import RunInterrupted, run

    over = ["recipe=dd_digits", "logger=none", "loss=mtt", "task.iterations=3",
            "trainer.epochs=2", "task.eval.epochs=2", "task.eval.models=1", "student.ipc=1",
            "task.net.width=8", "loss.experts.num=2", "loss.experts.epochs=2",
            "loss.expert_epochs=1", "loss.max_start_epoch=1", "loss.syn_steps=2",
            f"store.root={tmp_path / 'store'}"]
    run(make_cfg(over), tmp_path / "full", tty=False)
    assert len(list((tmp_path / "store" / "experts").glob("*/entry.json"))) == 1
    with pytest.raises(RunInterrupted):
        run(make_cfg(over + ["trainer.stop_at_step=4"]), tmp_path / "cut", tty=False)
    run(make_cfg(over + ["trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")["model"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    assert a["lr"].item() != pytest.approx(0.01, abs=1e-12)   # the step size was learned
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any("syn_lr" in k for k in rows[0])


def test_a_step_size_pushed_below_zero_stops_the_run_naming_lr_lr(root, data):
    obj, student = bound(root, data)
    obj.after_step({}, ctx(0))   # 0.01: fine
    with torch.no_grad():
        student.lr.fill_(-0.5)
    with pytest.raises(UserError) as err:
        obj.after_step({}, ctx(6))
    assert err.value.key == "loss.lr_lr" and "-0.5" in err.value.what


def test_the_runner_refuses_a_start_epoch_past_the_experts_before_training_them(tmp_path):
    from conftest import make_cfg

    from distill_cli.training.run import run

    over = ["recipe=dd_digits", "logger=none", "loss=mtt", "loss.experts.epochs=10",
            "loss.max_start_epoch=9", "loss.expert_epochs=2", f"store.root={tmp_path / 's'}"]
    with pytest.raises(UserError) as err:
        run(make_cfg(over), tmp_path / "r", tty=False)
    assert err.value.key == "loss.max_start_epoch" and "<= 8" in err.value.fix
    assert not (tmp_path / "s" / "experts").exists()
