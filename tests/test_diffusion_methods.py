"""The step-distillation objectives (distill_cli/tasks/diffusion/methods/{progressive,
consistency,reflow,direct}.py).

Every loss is checked against a float64 reference written HERE from the papers' formulas: the
references call only the tiny backbones below (real nn.Modules obeying the backbone contract
net(x, time, y)) and compute a(t), s(t), the parameterisations, Heun steps and distances
themselves; the objectives run the same backbones inside real Denoisers. Random draws are
replayed with the same per-sample `SampleDraws` (the objective's noise_seed, the step, the
batch's indices) in the order each objective documents. Identities (a DDIM target
that lands on the teacher's two steps, the consistency boundary, CT = CD with a clean-x teacher,
a straight coupling's zero loss), round switching, the EMA update, state_dict round trips and
the UserErrors complete the file."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_cfg
from torch import nn

from distill_cli.config import build
from distill_cli.data.bundle import Batch
from distill_cli.draws import SampleDraws
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.samplers import sample
from distill_cli.tasks.diffusion.methods.consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
)
from distill_cli.tasks.diffusion.methods.direct import Direct
from distill_cli.tasks.diffusion.methods.progressive import Progressive, two_step_target
from distill_cli.tasks.diffusion.methods.reflow import Reflow

D = torch.float64
B, C, H = 5, 2, 4
SD = 0.5


# ---------------------------------------------------------------------------- backbones
class TinyNet(nn.Module):
    """Two convolutions, a time (and class) embedding, optional dropout: net(x, time, y)."""

    def __init__(self, width: int = 6, num_classes: int = 3, conditional: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.inp = nn.Conv2d(C, width, 3, padding=1)
        self.time = nn.Linear(3, width)
        self.label = nn.Embedding(num_classes + 1, width) if conditional else None
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, C, 3, padding=1)

    def forward(self, x, time, y=None):
        time = time.to(x.dtype)
        emb = self.time(torch.stack([torch.sin(time / 300), torch.cos(time / 300),
                                     time / 1000], 1))
        if self.label is not None and y is not None:
            emb = emb + self.label(y)
        return self.out(self.drop(torch.tanh(self.inp(x) + emb[:, :, None, None])))


def cosine_as(t):
    """PD's log-SNR cosine schedule, written here: a = cos(θ), s = sin(θ), θ = a_c t + b_c."""
    b = math.atan(math.exp(-10.0))
    a_c = math.atan(math.exp(10.0)) - b
    theta = a_c * t + b
    return torch.cos(theta), torch.sin(theta)


class GaussianOracle(nn.Module):
    """x0-network of the Bayes-optimal denoiser for data x ~ N(m, sd² I) on vp_cosine:
    E[x | z_t] = m + a sd² (z - a m) / (a² sd² + s²). sd = 0: a point mass at m."""

    def __init__(self, m: torch.Tensor, sd: float):
        super().__init__()
        self.register_buffer("m", m)
        self.sd = sd
        self.out = nn.Identity()

    def forward(self, z, time, y=None):
        a, s = (v.view(-1, 1, 1, 1) for v in cosine_as(time.to(D) / 1000))
        return self.m + a * self.sd ** 2 * (z - a * self.m) / (a * a * self.sd ** 2 + s * s)


class Constant(nn.Module):
    """Outputs one fixed image whatever the input (an x0-teacher that always denoises to it)."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.register_buffer("image", image)
        self.out = nn.Identity()

    def forward(self, z, time, y=None):
        return self.image.expand_as(z).clone()


class StraightVelocity(nn.Module):
    """The exact velocity of the coupling x = 0.5 ε + m on the flow z = (1-t) x + t ε (our
    time): ε = (z - (1-t) m)/(0.5 + 0.5 t), dz/dt = ε - x = 0.5 ε - m."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.register_buffer("m", m)
        self.out = nn.Identity()

    def forward(self, z, time, y=None):
        t = (time.to(D) / 1000).view(-1, 1, 1, 1)
        eps = (z - (1 - t) * self.m) / (0.5 + 0.5 * t)
        return 0.5 * eps - self.m


def denoiser(net, process="vp_cosine", param="v", conditional=False, steps=8):
    return Denoiser(net, process=process, param=param, num_classes=3, conditional=conditional,
                    steps=steps).to(D)


def perturb(model, scale=0.05, seed=1):
    """Move a model's weights away from where bind left them (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def batch(seed=0, conditional=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, C, H, H, generator=g, dtype=D) * 2 - 1)
    y = torch.randint(0, 3, (B,), generator=g)
    return Batch(torch.arange(B), x, y)


def ctx(step=0, total=10):
    return StepContext(epoch=1, step=step, steps_per_epoch=total, total_steps=total)


def replay(obj, b, c) -> SampleDraws:
    """The objective's per-sample draws of step c.step, made again for the reference."""
    return SampleDraws(int(obj.noise_seed), c.step, b.index, "cpu")


def mean_dims(v):
    return v.flatten(1).mean(1)


def pseudo_huber(a, b):
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c * c) - c


class MemoryPairs:
    """The stored-pairs interface (`get(index) -> (noise, endpoint)`) over in-memory tensors."""

    def __init__(self, noise, endpoint):
        self.noise, self.endpoint = noise, endpoint

    def get(self, index):
        return self.noise[index.cpu()].to(index.device), self.endpoint[index.cpu()].to(index.device)


# ---------------------------------------------------------------------------- per-sample draws
def test_sample_draws_are_a_function_of_seed_step_and_index_only():
    """A slice of the indices draws exactly the rows the whole batch draws for them (what a
    torchrun rank holding that slice draws); successive calls continue each sample's stream;
    the seed and the step change the draws; the default RNG is neither read nor advanced."""
    index = torch.tensor([7, 3, 120, 0, 55, 9])

    def draw(seed, step, idx):
        d = SampleDraws(seed, step, idx, "cpu")
        return d.normal(2, 3), d.uniform(), d.integers(1000), d.normal()

    before = torch.get_rng_state()
    whole = draw(5, 2, index)
    assert torch.equal(torch.get_rng_state(), before)
    shapes = [tuple(v.shape) for v in whole]
    assert shapes == [(6, 2, 3), (6,), (6,), (6,)]
    assert [v.dtype for v in whole] == [torch.float32, torch.float64, torch.int64,
                                        torch.float32]
    for part in (slice(0, 3), slice(3, 6), slice(2, 3)):
        for w, p in zip(whole, draw(5, 2, index[part])):
            assert torch.equal(w[part], p)
    shuffled = torch.tensor([4, 0, 5])          # order within the batch does not matter
    for w, p in zip(whole, draw(5, 2, index[shuffled])):
        assert torch.equal(w[shuffled], p)
    torch.manual_seed(123)                      # nor does the default RNG's state
    assert all(torch.equal(w, p) for w, p in zip(whole, draw(5, 2, index)))
    for other in (draw(6, 2, index), draw(5, 3, index)):
        assert not torch.equal(whole[0], other[0]) and not torch.equal(whole[1], other[1])
    d = SampleDraws(5, 2, index, "cpu")
    assert not torch.equal(d.normal(2, 3), d.normal(2, 3))   # a stream, not a replay
    assert (whole[2] >= 0).all() and (whole[2] < 1000).all()
    assert ((whole[1] >= 0) & (whole[1] < 1)).all()
    assert SampleDraws(5, 2, index[:0], "cpu").normal(2, 3).shape == (0, 2, 3)


def bound(method):
    """A bound objective of each method that draws noise, and its models (no dropout)."""
    if method == "progressive":
        obj, student, teacher = bound_progressive()
        return obj, student, teacher, ctx(0, 9)
    if method == "consistency":
        teacher = denoiser(TinyNet(), process="edm", param="edm").eval()
        student = denoiser(TinyNet())
        obj = ConsistencyDistillation(scales=6, mu=0.5)
        torch.manual_seed(0)
        obj.bind(student, teacher, None)
        perturb(student)
        return obj, student, teacher, ctx()
    obj, student = bound_reflow(k=4, x0_randomness="fix_0.5")
    return obj, student, None, ctx(3, 20)


@pytest.mark.parametrize("method", ["progressive", "consistency", "reflow"])
def test_a_batch_split_in_slices_computes_the_batch_loss(method):
    """What torchrun ranks compute: the slices of a global batch (indices kept), weighted by
    their sizes, give the whole batch's loss, because each sample draws its own noise."""
    obj, student, teacher, c = bound(method)
    b = batch()
    whole = obj.step_terms(student, teacher, b, c)["loss"]
    parts = [obj.step_terms(student, teacher, Batch(*(t[p] for t in b)), c)["loss"] * (
        p.stop - p.start) for p in (slice(0, 2), slice(2, 5))]
    assert torch.allclose(sum(parts) / B, whole, rtol=1e-12, atol=0)
    # and a noise_seed drawn under another run seed changes the loss
    state = obj.state_dict()
    state["noise_seed"] = state["noise_seed"] + 1
    twin = copy.deepcopy(obj)
    twin.load_state_dict(state)
    assert not torch.allclose(twin.step_terms(student, teacher, b, c)["loss"], whole)


# ---------------------------------------------------------------------------- progressive
def x_of(net, param, z, t, y=None):
    """(x̂, ε̂) on vp_cosine from a raw network, written from PD's formulas (a² + s² = 1)."""
    a, s = (v.view(-1, 1, 1, 1) for v in cosine_as(t))
    out = net(z, 1000 * t, y)
    if param == "x0":
        return out, (z - a * out) / s
    if param == "v":
        x = a * z - s * out
        return x, (z - a * x) / s
    raise AssertionError(param)


def progressive_reference(student_net, teacher_net, teacher_param, x, k, eps, n, weighting):
    grid = torch.linspace(1.0, 0.0, 2 * n + 1, dtype=D)
    t, tm, tn = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
    a, s = (v.view(-1, 1, 1, 1) for v in cosine_as(t))
    am, sm = (v.view(-1, 1, 1, 1) for v in cosine_as(tm))
    an, sn = (v.view(-1, 1, 1, 1) for v in cosine_as(tn))
    z = a * x + s * eps
    x1, e1 = x_of(teacher_net, teacher_param, z, t)
    z1 = am * x1 + sm * e1
    x2, e2 = x_of(teacher_net, teacher_param, z1, tm)
    z2 = an * x2 + sn * e2
    x_t = (z2 - sn / s * z) / (an - sn / s * a)
    x_t = torch.where((k == n - 1).view(-1, 1, 1, 1), x2, x_t)
    xh, eh = x_of(student_net, "v", z, t)
    x_mse = mean_dims((xh - x_t) ** 2)
    if weighting == "snr_trunc":
        return (torch.clamp(a.flatten() ** 2 / s.flatten() ** 2, min=1) * x_mse).mean()
    e_t = (z - a * x_t) / s
    return mean_dims(((a * eh - s * xh) - (a * e_t - s * x_t)) ** 2).mean()


def bound_progressive(**kw):
    teacher = denoiser(TinyNet(), param="x0").eval()
    student = denoiser(TinyNet())
    obj = Progressive(**{"start_steps": 8, "end_steps": 1, **kw})
    torch.manual_seed(0)                 # the run seeds the default RNG before bind
    obj.bind(student, teacher, None)
    perturb(student)
    return obj, student, teacher


@pytest.mark.parametrize("weighting", ["snr_trunc", "v_mse"])
def test_progressive_loss_matches_reference(weighting):
    obj, student, teacher = bound_progressive(weighting=weighting, steps_per_round=3)
    b = batch()
    terms = obj.step_terms(student, teacher, b, ctx(0, 9))
    draws = replay(obj, b, ctx(0, 9))
    k = draws.integers(4)
    eps = draws.normal(C, H, H, dtype=D)
    assert (k == 3).any() and (k < 3).any()   # both branches of x̃ are exercised
    ref = progressive_reference(student.net, teacher.net, "x0", b.x, k, eps, 4, weighting)
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)
    assert terms["student_steps"].item() == 4 and terms["round"].item() == 0
    terms["loss"].backward()
    assert student.net.inp.weight.grad is not None


def test_progressive_conditional_guided_teacher():
    """Labels reach both models; the round-0 teacher runs guided (x̂ = x̂_u + w (x̂_c - x̂_u),
    ε̂ likewise, the null label = num_classes); the student learns it at w = 1 and then
    samples at w = 1."""
    teacher = Denoiser(TinyNet(conditional=True), process="vp_cosine", param="x0",
                       num_classes=3, conditional=True, guidance=2.0).to(D).eval()
    student = Denoiser(TinyNet(conditional=True), process="vp_cosine", param="v",
                       num_classes=3, conditional=True, guidance=2.0).to(D)
    obj = Progressive(start_steps=4)
    torch.manual_seed(0)
    obj.bind(student, teacher, None)
    perturb(student)
    assert student.guidance == 1.0
    b = batch()
    terms = obj.step_terms(student, teacher, b, ctx(0, 4))
    draws = replay(obj, b, ctx(0, 4))
    k = draws.integers(2)
    eps = draws.normal(C, H, H, dtype=D)
    null = torch.full_like(b.y, 3)

    class Guided(nn.Module):            # the guided teacher as one x0-network, written here
        def forward(self, z, time, y=None):
            u = teacher.net(z, time, null)
            return u + 2.0 * (teacher.net(z, time, b.y) - u)

    class Labelled(nn.Module):
        def forward(self, z, time, y=None):
            return student.net(z, time, b.y)

    labelled = Labelled()
    ref = progressive_reference(labelled, Guided(), "x0", b.x, k, eps, 2, "snr_trunc")
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)


def test_progressive_bind_starts_from_teacher_and_sets_sampler():
    teacher = denoiser(TinyNet(), param="x0")
    student = denoiser(TinyNet())
    Progressive(start_steps=16).bind(student, teacher, None)
    for (k, v), w in zip(student.net.state_dict().items(), teacher.net.state_dict().values()):
        assert torch.equal(v, w), k
    # sampled (and selected) at the final step count in every round
    assert (student.param, student.sampler, student.steps) == ("v", "ddim", 1)


@pytest.mark.parametrize("sd", [0.0, 0.3])
def test_progressive_target_lands_on_the_two_teacher_steps(sd):
    """One DDIM step from (z, t) with x̃ reaches the optimal teacher's two-step z'' exactly;
    for a point mass (sd = 0, where DDIM is exact) x̃ IS the data point."""
    m = torch.linspace(-0.5, 0.5, C * H * H, dtype=D).view(1, C, H, H)
    teacher = denoiser(GaussianOracle(m, sd), param="x0")
    z = torch.randn(B, C, H, H, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 0.75, 0.5, 0.5, 0.25], dtype=D)
    tm, tn = t - 0.125, t - 0.25
    last = tn == 0
    x_t = two_step_target(teacher, None, z, t, tm, tn, None, last)

    def oracle(zz, tt):
        a, s = (v.view(-1, 1, 1, 1) for v in cosine_as(tt))
        x = m + a * sd ** 2 * (zz - a * m) / (a * a * sd ** 2 + s * s)
        return x, (zz - a * x) / s

    a, s = (v.view(-1, 1, 1, 1) for v in cosine_as(t))
    am, sm = (v.view(-1, 1, 1, 1) for v in cosine_as(tm))
    an, sn = (v.view(-1, 1, 1, 1) for v in cosine_as(tn))
    x1, e1 = oracle(z, t)
    x2, e2 = oracle(am * x1 + sm * e1, tm)
    two_steps = an * x2 + sn * e2
    one_step = an * x_t + sn * (z - a * x_t) / s
    assert torch.allclose(one_step[~last], two_steps[~last], atol=1e-10)
    assert torch.allclose(x_t[last], x2[last], atol=1e-12)
    if sd == 0.0:
        assert torch.allclose(x_t, m.expand_as(x_t), atol=1e-9)


def test_progressive_rounds_snapshot_and_halve():
    obj, student, teacher = bound_progressive(start_steps=4, steps_per_round=2)
    b = batch()
    total = 5
    for step in range(2):
        terms = obj.step_terms(student, teacher, b, ctx(step, total))
        assert terms["round"].item() == 0 and terms["student_steps"].item() == 2
        assert int(obj.round) == 0 and student.steps == 1
        perturb(student, seed=10 + step)     # stands in for the optimizer step
    boundary = {k: v.clone() for k, v in student.state_dict().items()}
    terms = obj.step_terms(student, teacher, b, ctx(2, total))
    assert int(obj.round) == 1 and terms["student_steps"].item() == 1
    snap = obj.snapshot.state_dict()
    assert all(torch.equal(snap[k], v) for k, v in boundary.items())
    # round 1's teacher is the round-0 student (v, guidance 1) with 2 steps, the student 1
    draws = replay(obj, b, ctx(2, total))
    k = draws.integers(1)
    eps = draws.normal(C, H, H, dtype=D)
    ref = progressive_reference(student.net, obj.snapshot.net, "v", b.x, k, eps, 1, "snr_trunc")
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)
    perturb(student, seed=20)
    obj.step_terms(student, teacher, b, ctx(4, total))   # the last round keeps the remainder
    assert int(obj.round) == 1 and all(torch.equal(obj.snapshot.state_dict()[k], v)
                                       for k, v in boundary.items())


def test_progressive_state_dict_round_trip():
    obj, student, teacher = bound_progressive(start_steps=4, steps_per_round=2)
    obj.step_terms(student, teacher, batch(), ctx(2, 4))      # round 1: snapshot taken
    state = obj.state_dict()
    assert "round" in state and any(k.startswith("snapshot.net.") for k in state)
    assert list(obj.parameters()) == []
    fresh, s2, t2 = bound_progressive(start_steps=4, steps_per_round=2)
    fresh.load_state_dict(state)
    assert int(fresh.round) == 1 and s2.steps == 1            # before any step (resume)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    fresh.step_terms(s2, t2, batch(), ctx(3, 4))              # same round: no new snapshot
    assert all(torch.equal(fresh.snapshot.state_dict()[k], v)
               for k, v in obj.snapshot.state_dict().items())
    assert s2.steps == 1


@pytest.mark.parametrize("kw", [{"start_steps": 48}, {"start_steps": 8, "end_steps": 3},
                                {"start_steps": 4, "end_steps": 4}])
def test_progressive_refuses_step_counts_it_cannot_halve(kw):
    with pytest.raises(UserError) as err:
        Progressive(**kw)
    assert err.value.key == "loss.start_steps"


def test_progressive_refuses_too_few_steps_for_its_rounds():
    obj, student, teacher = bound_progressive(start_steps=8)
    with pytest.raises(UserError) as err:
        obj.step_terms(student, teacher, batch(), ctx(0, 2))
    assert err.value.key == "loss.steps_per_round"
    obj, student, teacher = bound_progressive(start_steps=8, steps_per_round=4)
    with pytest.raises(UserError) as err:
        obj.step_terms(student, teacher, batch(), ctx(0, 10))
    assert err.value.key == "loss.steps_per_round"


@pytest.mark.parametrize("cls,kw", [(Progressive, {}), (ConsistencyDistillation, {}),
                                    (Direct, {}), (Reflow, {"init_from_teacher": True})])
def test_init_from_teacher_refuses_another_architecture(cls, kw):
    teacher = denoiser(TinyNet(width=6), param="x0")
    student = denoiser(TinyNet(width=8))
    obj = cls(**kw)
    if hasattr(obj, "use_samples"):
        obj.use_samples(MemoryPairs(*flow_pairs()))
    with pytest.raises(UserError) as err:
        obj.bind(student, teacher, None)
    assert err.value.key == "student"


def test_methods_refuse_a_classifier_teacher():
    with pytest.raises(UserError) as err:
        Progressive().bind(denoiser(TinyNet()), nn.Linear(2, 2), None)
    assert err.value.key == "teacher"


# ---------------------------------------------------------------------------- consistency
def karras(n, smin=0.002, smax=80.0, rho=7.0):
    i = torch.arange(n, dtype=D)
    return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def edm_f(net, x, sigma, boundary):
    """EDM (boundary=False) or consistency (boundary=True) preconditioned x̂, written here."""
    sg = sigma.view(-1, 1, 1, 1)
    shift = sg - 0.002 if boundary else sg
    c_skip = SD ** 2 / (shift ** 2 + SD ** 2)
    c_out = shift * SD / torch.sqrt(sg ** 2 + SD ** 2)
    c_in = 1 / torch.sqrt(sg ** 2 + SD ** 2)
    return c_skip * x + c_out * net(c_in * x, torch.log(sigma) / 4)


def test_consistency_distillation_matches_reference():
    """Heun step of an EDM teacher, consistency scalings, pseudo-Huber, a target network that
    differs from the online one, and dropout masks shared by the online and target passes."""
    teacher = denoiser(TinyNet(), process="edm", param="edm").eval()
    student = denoiser(TinyNet(dropout=0.3))
    obj = ConsistencyDistillation(scales=6, mu=0.5)
    torch.manual_seed(0)
    obj.bind(student, teacher, None)
    assert (student.process.name, student.param, student.sampler, student.steps) == (
        "edm", "consistency", "consistency", 1)
    perturb(student)                 # online θ != target θ⁻ (still the teacher's weights)
    student.train()
    b = batch()
    torch.manual_seed(7)             # the dropout masks: the default RNG
    terms = obj.step_terms(student, teacher, b, ctx())
    draws = replay(obj, b, ctx())
    n = draws.integers(5)
    z = draws.normal(C, H, H, dtype=D)
    sig = karras(6)
    t, t2 = sig[n], sig[n + 1]
    x_t = b.x + t.view(-1, 1, 1, 1) * z
    torch.manual_seed(7)             # the noise did not come from it: the masks start here
    state = torch.get_rng_state()
    online = edm_f(student.net, x_t, t, True)
    tc, t2c = t.view(-1, 1, 1, 1), t2.view(-1, 1, 1, 1)
    with torch.no_grad():
        d = (x_t - edm_f(teacher.net, x_t, t, False)) / tc
        x1 = x_t + (t2c - tc) * d
        d1 = (x1 - edm_f(teacher.net, x1, t2, False)) / t2c
        x_t2 = x_t + (t2c - tc) * (d + d1) / 2
        torch.set_rng_state(state)
        target_net = copy.deepcopy(obj.target.net).train()
        goal = edm_f(target_net, x_t2, t2, True)
    ref = pseudo_huber(online, goal).mean()
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)
    assert terms["N"].item() == 6 and terms["mu"].item() == 0.5


def test_consistency_boundary_condition():
    student = denoiser(TinyNet())
    ConsistencyTraining().bind(student, None, None)
    x = batch().x
    assert torch.allclose(student.x0_sigma(x, torch.full((B,), 0.002, dtype=D)), x,
                          atol=1e-12)
    assert torch.allclose(student.predict(x, 0.0)[0], x, atol=1e-12)


def test_consistency_training_target_is_cd_with_a_clean_x_teacher():
    image = batch().x[:1]
    b = Batch(torch.arange(B), image.expand(B, -1, -1, -1).clone(), torch.zeros(B).long())
    teacher = denoiser(Constant(image), param="x0").eval()   # D(x_σ, σ) = the clean x
    s1 = denoiser(TinyNet())
    s2 = copy.deepcopy(s1)
    cd = ConsistencyDistillation(scales=7, mu=0.0, init_from_teacher=False)
    ct = ConsistencyTraining(s0=7, s1=7)
    torch.manual_seed(11)            # the same run seed: the same noise_seed
    cd.bind(s1, teacher, None)
    torch.manual_seed(11)
    ct.bind(s2, None, None)
    assert int(cd.noise_seed) == int(ct.noise_seed)
    l_cd = cd.step_terms(s1, teacher, b, ctx(0))
    l_ct = ct.step_terms(s2, None, b, ctx(0))
    assert l_ct["N"].item() == 7
    assert torch.allclose(l_cd["loss"], l_ct["loss"], rtol=1e-9, atol=1e-12)


def test_consistency_training_schedule_and_ema_update():
    student = denoiser(TinyNet())
    obj = ConsistencyTraining(s0=2, s1=150, mu0=0.9)
    obj.bind(student, None, None)
    perturb(student)
    before = {k: v.clone() for k, v in obj.target.state_dict().items()}
    terms = obj.step_terms(student, None, batch(), ctx(30, 100))
    obj.after_step(terms, ctx(30, 100))
    n = math.ceil(math.sqrt(0.3 * (151 ** 2 - 4) + 4) - 1)        # 82
    mu = math.exp(2 * math.log(0.9) / n)
    assert terms["N"].item() == n + 1 and terms["mu"].item() == pytest.approx(mu, rel=1e-6)
    for k, p in student.named_parameters():
        assert torch.allclose(obj.target.state_dict()[k], mu * before[k] + (1 - mu) * p,
                              rtol=0, atol=1e-14), k
    assert ConsistencyTraining().schedule(ctx(0, 100)) == (2, pytest.approx(0.81))


def test_consistency_mu_zero_target_is_the_online_weights():
    teacher = denoiser(TinyNet(), process="edm", param="edm")
    student = denoiser(TinyNet())
    obj = ConsistencyDistillation(mu=0.0)
    obj.bind(student, teacher, None)
    perturb(student)
    obj.after_step({}, ctx())
    for k, p in student.named_parameters():
        assert torch.equal(obj.target.state_dict()[k], p), k


def test_consistency_state_dict_round_trip():
    obj = ConsistencyTraining()
    student = denoiser(TinyNet())
    obj.bind(student, None, None)
    perturb(student)
    obj.after_step({}, ctx(3, 10))
    state = obj.state_dict()
    assert any(k.startswith("target.net.") for k in state) and list(obj.parameters()) == []
    fresh = ConsistencyTraining()
    fresh.bind(denoiser(TinyNet()), None, None)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("kw,key", [({"distance": "lpips"}, "loss.distance"),
                                    ({"mu": 1.0}, "loss.mu"), ({"scales": 1}, "loss.scales")])
def test_consistency_bad_options(kw, key):
    with pytest.raises(UserError) as err:
        ConsistencyDistillation(**kw)
    assert err.value.key == key


# ---------------------------------------------------------------------------- reflow
def flow_pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, C, H, H, generator=g, dtype=D)
    return noise, torch.rand(B, C, H, H, generator=g, dtype=D) * 2 - 1


def bound_reflow(teacher=None, **kw):
    teacher = teacher or denoiser(TinyNet(), process="flow", param="velocity")
    student = denoiser(TinyNet())
    obj = Reflow(**kw)
    obj.use_samples(MemoryPairs(*flow_pairs()))
    torch.manual_seed(0)
    obj.bind(student, teacher, None)
    perturb(student)
    return obj, student


@pytest.mark.parametrize("k,spec,step", [(None, None, 0), (None, "warmup_10", 3),
                                         (4, "cos_10", 4), (4, None, 0)])
def test_reflow_velocity_loss_matches_reference(k, spec, step):
    obj, student = bound_reflow(k=k, x0_randomness=spec)
    assert (student.process.name, student.param, student.sampler) == ("flow", "velocity",
                                                                      "euler")
    noise, x = flow_pairs()
    terms = obj.step_terms(student, None, batch(), ctx(step, 20))
    draws = replay(obj, batch(), ctx(step, 20))
    if k is None:
        t = draws.uniform()
    else:
        t = 1 - draws.integers(k).to(D) / k
    beta = {None: 0.0, "warmup_10": 0.7, "cos_10": (1 + math.cos(math.pi * 0.4)) / 2}[spec]
    if beta:
        noise = math.sqrt(1 - beta ** 2) * noise + beta * draws.normal(C, H, H, dtype=D)
    tc = t.view(-1, 1, 1, 1)
    z = (1 - tc) * x + tc * noise
    ref = mean_dims((student.net(z, 1000 * t) - (noise - x)) ** 2).mean()
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)
    assert terms["beta"].item() == pytest.approx(beta)


def test_reflow_one_step_image_distance():
    obj, student = bound_reflow(k="t0", distance="pseudo_huber+l2")
    noise, x = flow_pairs()
    terms = obj.step_terms(student, None, batch(), ctx())
    out = student.net(noise, torch.full((B,), 1000.0, dtype=D))
    ref = (pseudo_huber(noise - out, x) + mean_dims((out - (noise - x)) ** 2)).mean()
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)


def test_reflow_straight_coupling_oracle_has_zero_loss():
    """An already straight coupling (x = 0.5 ε + m, paths never cross) and its exact velocity:
    zero loss at every t, and one Euler step maps the noise onto the endpoint."""
    m = torch.linspace(-0.3, 0.3, C * H * H, dtype=D).view(1, C, H, H)
    noise = torch.randn(B, C, H, H, dtype=D, generator=torch.Generator().manual_seed(4))
    student = denoiser(StraightVelocity(m))
    obj = Reflow(init_from_teacher=False)
    obj.use_samples(MemoryPairs(noise, 0.5 * noise + m))
    obj.bind(student, denoiser(TinyNet()), None)
    terms = obj.step_terms(student, None, batch(), ctx())
    assert terms["loss"].item() < 1e-24
    one = sample(student, noise, steps=1, method="euler", clip=False)
    assert torch.allclose(one, 0.5 * noise + m, atol=1e-12)


def test_reflow_init_from_teacher_auto():
    flow_teacher = denoiser(TinyNet(), process="flow", param="velocity")
    s = denoiser(TinyNet())
    r = Reflow()
    r.use_samples(MemoryPairs(*flow_pairs()))
    r.bind(s, flow_teacher, None)
    assert all(torch.equal(a, b) for a, b in zip(s.net.state_dict().values(),
                                                 flow_teacher.net.state_dict().values()))
    vp_teacher = denoiser(TinyNet(), param="x0")                      # VP teacher: not copied
    s = denoiser(TinyNet())
    own = {k: v.clone() for k, v in s.net.state_dict().items()}
    r = Reflow()
    r.use_samples(MemoryPairs(*flow_pairs()))
    r.bind(s, vp_teacher, None)
    assert all(torch.equal(own[k], v) for k, v in s.net.state_dict().items())


@pytest.mark.parametrize("kw,key", [({"distance": "pseudo_huber"}, "loss.distance"),
                                    ({"distance": "lpips", "k": "t0"}, "loss.distance"),
                                    ({"x0_randomness": "slow_10"}, "loss.x0_randomness"),
                                    ({"k": 0}, "loss.k")])
def test_reflow_bad_options(kw, key):
    with pytest.raises(UserError) as err:
        Reflow(**kw)
    assert err.value.key == key


# ---------------------------------------------------------------------------- direct
def test_direct_loss_matches_reference():
    teacher = denoiser(TinyNet(), param="x0")
    student = denoiser(TinyNet())
    obj = Direct()
    noise, x = flow_pairs()
    x = x * 1.2                                   # some endpoints outside [-1, 1]: clipped
    obj.use_samples(MemoryPairs(noise, x))
    obj.bind(student, teacher, None)
    assert (student.param, student.sampler, student.steps) == ("x0", "onestep", 1)
    perturb(student)
    terms = obj.step_terms(student, teacher, batch(), ctx())
    q = torch.floor((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    s_max = cosine_as(torch.tensor(1.0, dtype=D))[1]
    x_hat = student.net(s_max * noise, torch.full((B,), 1000.0, dtype=D))
    ref = (x_hat - q).abs().flatten(1).sum(1).mean()
    assert torch.allclose(terms["loss"], ref, rtol=1e-9, atol=1e-12)
    assert ((q + 1) * 127.5 - torch.round((q + 1) * 127.5)).abs().max() < 1e-9
    obj = Direct(distance="l2", quantise_targets=False)
    obj.use_samples(MemoryPairs(noise, x))
    obj.bind(student, teacher, None)   # back to the teacher's weights
    terms = obj.step_terms(student, teacher, batch(), ctx())
    x_hat = student.net(s_max * noise, torch.full((B,), 1000.0, dtype=D))
    assert torch.allclose(terms["loss"], ((x_hat - x) ** 2).flatten(1).sum(1).mean(),
                          rtol=1e-9, atol=1e-12)


def test_direct_refuses_an_eps_student_at_pure_noise():
    obj = Direct()
    obj.use_samples(MemoryPairs(*flow_pairs()))
    with pytest.raises(UserError) as err:
        obj.bind(denoiser(TinyNet()), denoiser(TinyNet(), param="eps"), None)
    assert err.value.key == "loss.param"


# ---------------------------------------------------------------------------- the YAMLs
@pytest.mark.parametrize("name,cls", [("progressive", Progressive),
                                      ("consistency", ConsistencyDistillation),
                                      ("consistency_training", ConsistencyTraining),
                                      ("reflow", Reflow), ("direct", Direct)])
def test_each_yaml_builds_and_trains_one_step(name, cls, tmp_path):
    """conf/loss/<name>.yaml composes, builds through the one instantiate call site with its
    defaults, binds to real Denoisers and gives a finite loss with a gradient."""
    node = make_cfg([f"loss={name}", f"store.root={tmp_path}"]).loss
    obj = build.build_objective(node)
    assert type(obj) is cls and obj.task_name == "diffusion" and obj.batch_coupling is None
    if name in ("reflow", "direct"):
        assert obj.stored_samples == "pairs"
        assert obj.samples_options == {"sampler": None, "steps": None, "seed": 0,
                                       "dtype": "float16"}
        obj.use_samples(MemoryPairs(*flow_pairs()))
    else:
        assert getattr(obj, "stored_samples", None) is None
    teacher = denoiser(TinyNet(), param="x0").eval() if obj.needs_teacher else None
    student = denoiser(TinyNet())
    obj.bind(student, teacher, None)
    terms = obj.step_terms(student, teacher, batch(), ctx(0, 64))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and student.net.out.weight.grad is not None
    obj.after_step(terms, ctx(0, 64))


def test_progressive_starts_from_the_teachers_own_step_count_by_default():
    teacher = denoiser(TinyNet())
    teacher.steps = 8
    obj = Progressive()
    obj.bind(denoiser(TinyNet()), teacher, None)
    assert (obj.start_steps, obj.rounds) == (8, 3)
    teacher.steps = 6   # not a power of two: refused, naming the key that set it
    with pytest.raises(UserError) as err:
        Progressive().bind(denoiser(TinyNet()), teacher, None)
    assert err.value.key == "task.steps"
