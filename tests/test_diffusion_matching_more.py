"""SiD, f-distill and phased DMD (METHODS_FAMILIES.md A7-A9): SiD's generator loss against a
float64 reference written from the formula (gradient through both score networks' inputs), its
critic-first order, f-distill's h(r) weights and its reverse-KL case equal to DMD2 bit for bit,
phased DMD's times inside each phase, every method end to end, SiD's exact resume with three
networks, and refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_cfg
from test_diffusion_task import TINY
from torch import nn

from distill_cli.draws import SampleDraws
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.noise import build_process
from distill_cli.runs import checkpoint
from distill_cli.tasks.diffusion.methods.fdistill import FDistill, f_weight
from distill_cli.tasks.diffusion.methods.matching import FakeScore, time_grid
from distill_cli.tasks.diffusion.methods.phased_dmd import PhasedDMD
from distill_cli.tasks.diffusion.methods.sid import SiD
from distill_cli.teachers.topology import CriticTopology
from distill_cli.training.distributed import World
from distill_cli.training.run import RunInterrupted, run

D = torch.float64
SHAPE = (1, 2, 2)


class GaussianPosterior(nn.Module):
    """E[x | z_t] for data x ~ N(scale mu, v) per pixel, as an x0 backbone (input z, time
    1000 t); `scale` is trainable, `seen` records the times it was called at."""

    def __init__(self, proc, mu, v):
        super().__init__()
        self.proc, self.mu, self.v = proc, mu, v
        self.scale = nn.Parameter(torch.ones((), dtype=D))
        self.out = nn.Identity()
        self.seen: list[torch.Tensor] = []

    def forward(self, z, time, y):
        t = time.double() / 1000
        self.seen.append(t.detach().clone())
        a, s = self.proc.a(t).view(-1, 1, 1, 1), self.proc.s(t).view(-1, 1, 1, 1)
        return posterior(self.mu * self.scale, self.v, a, s, z)


def posterior(mu, v, a, s, z):
    return mu + a * v * (z - a * mu) / (a * a * v + s * s)


def gaussian_denoiser(proc, mu, v):
    return Denoiser(GaussianPosterior(proc, mu, v), process=proc, param="x0", num_classes=0,
                    conditional=False)


class Data:
    input_shape = SHAPE


def batch_of(n, x=None):
    return type("B", (), {"index": torch.arange(n),
                          "x": torch.zeros(n, *SHAPE, dtype=D) if x is None else x,
                          "y": torch.zeros(n, dtype=torch.long)})()


def toy(proc, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_r = torch.randn(1, *SHAPE, generator=g, dtype=D) * 0.3
    v_r = torch.full((1, *SHAPE), 0.2, dtype=D)
    return mu_r, v_r, mu_r + 0.4, torch.full((1, *SHAPE), 0.35, dtype=D)


# ------------------------------------------------------------------------------ SiD
def sid_reference(x, z_noise, t, proc, real, fake, alpha, scaling, detach_scores=False):
    """float64, from the formula (A7): y = E[x | x + sigma n] of each Gaussian, w = sg(mean
    |x - y_r|).clip(1e-5), L = scaling * mean_b sum (y_r - y_f)((y_r - x) - alpha(y_r - y_f))/w."""
    a, s = proc.a(t).view(-1, 1, 1, 1), proc.s(t).view(-1, 1, 1, 1)
    z = a * x + s * z_noise
    y_r, y_f = posterior(*real, a, s, z), posterior(*fake, a, s, z)
    if detach_scores:
        y_r, y_f = y_r.detach(), y_f.detach()
    w = (x - y_r).abs().flatten(1).mean(1).detach().clamp(min=1e-5).view(-1, 1, 1, 1)
    per = ((y_r - y_f) * ((y_r - x) - alpha * (y_r - y_f)) / w).flatten(1).sum(1)
    return scaling * per.mean()


@pytest.mark.parametrize("process", ["vp_cosine", "edm"])
def test_sid_generator_loss_matches_a_float64_reference_with_gradient_through_both_scores(
        process):
    proc = build_process(process)
    mu_r, v_r, mu_f, v_f = toy(proc)
    teacher = gaussian_denoiser(proc, mu_r, v_r).requires_grad_(False)
    critic = FakeScore(gaussian_denoiser(proc, mu_f, v_f), SHAPE, gan=False)
    topology = type("T", (), {"model": teacher, "critic": critic})
    obj = SiD(alpha=1.2, loss_scaling=100.0)
    n = 6
    x0 = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=D) * 0.5
    x = x0.clone().requires_grad_(True)
    terms = obj.generator_terms(x, None, topology, batch_of(n), SampleDraws(3, 5, torch.arange(n), "cpu"))
    terms["loss"].backward()
    # the same draws, by hand: a grid index U{0..800} of the 1000-point grid, then eps
    draws = SampleDraws(3, 5, torch.arange(n), "cpu")
    index = draws.integers(801)
    assert int(index.max()) <= 800
    t = time_grid(proc)[index]
    eps = draws.normal(*SHAPE)
    x_ref = x0.clone().requires_grad_(True)
    ref = sid_reference(x_ref, eps.double(), t, proc, (mu_r, v_r), (mu_f, v_f), 1.2, 100.0)
    ref.backward()
    torch.testing.assert_close(terms["loss"].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # with y_r, y_f detached the gradient is another one: it does flow through both networks
    x_det = x0.clone().requires_grad_(True)
    sid_reference(x_det, eps.double(), t, proc, (mu_r, v_r), (mu_f, v_f), 1.2, 100.0,
                  detach_scores=True).backward()
    assert (x.grad - x_det.grad).abs().max() > 1e-2 * x_det.grad.abs().max()
    # and neither network's parameters learn from the generator's loss
    assert critic.denoiser.net.scale.grad is None and teacher.net.scale.grad is None


def test_sid_trains_the_critic_first_and_the_generator_reads_the_updated_critic():
    """One step with a real CriticTopology (SGD): the critic's parameters after it equal one
    manual SGD step on the fake-score loss of sg(G(z1)); the generator's loss equals SiD's
    loss on FRESH noise z2 against that UPDATED critic, not the one before the update."""
    proc = build_process("vp_cosine")
    mu_r, v_r, mu_s, v_s = toy(proc, seed=2)
    teacher = gaussian_denoiser(proc, mu_r, v_r).requires_grad_(False)
    student = gaussian_denoiser(proc, mu_s, v_s)   # a different generator than the teacher
    obj = SiD(fake_loss={"weighting": "edm", "time_sampling": "lognormal"})
    torch.manual_seed(0)
    obj.bind(student, teacher, Data())
    critic = obj.build_critic(teacher)
    with torch.no_grad():
        critic.denoiser.net.mu = mu_r + 0.1   # a fake score that is not the teacher's
    before = copy.deepcopy(critic)
    lr = 0.05
    opt = torch.optim.SGD(critic.parameters(), lr=lr)
    topo = CriticTopology(teacher, critic, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1),
                          critic_first=True, grad_clip=None, world=World())
    n, step = 5, 7
    batch = batch_of(n)
    terms = obj.step_terms(student, topo, batch, StepContext(1, step, 10, 10))

    draws = SampleDraws(int(obj.noise_seed), step, batch.index, "cpu")
    t0 = torch.tensor(student.start_time(), dtype=D)
    x_c = student.predict(proc.s(t0) * draws.normal(*SHAPE), t0)[0].float()
    manual = copy.deepcopy(before)
    obj.fake_loss.terms(manual.denoiser, x_c, None, draws)["loss"].backward()
    with torch.no_grad():
        manual.denoiser.net.scale -= lr * manual.denoiser.net.scale.grad
    new, old = (float(c.denoiser.net.scale.detach()) for c in (critic, before))
    assert new == pytest.approx(float(manual.denoiser.net.scale.detach()), abs=1e-12)
    assert new != old
    z2 = proc.s(t0) * draws.normal(*SHAPE)     # fresh noise for the generator's turn
    x_g = student.predict(z2, t0)[0].float()
    assert not torch.equal(x_g, x_c)
    after = obj.generator_terms(x_g, None, type("T", (), {"model": teacher, "critic": manual}),
                                batch, draws)
    torch.testing.assert_close(terms["loss"], after["loss"], rtol=1e-6, atol=1e-7)
    replay = SampleDraws(int(obj.noise_seed), step, batch.index, "cpu")
    replay.normal(*SHAPE)                                  # the critic's sample noise
    replay.normal(dtype=D), replay.normal(*SHAPE)          # the fake loss's t and eps
    replay.normal(*SHAPE)                                  # the generator's fresh noise
    stale = obj.generator_terms(x_g, None, type("T", (), {"model": teacher, "critic": before}),
                                batch, replay)
    gap = float(stale["loss"].detach()) - float(terms["loss"].detach())
    assert abs(gap) > 1e-4 * abs(float(terms["loss"].detach()))
    assert float(terms["gen_turn"]) == 1.0 and not terms["critic_loss"].requires_grad


# ------------------------------------------------------------------------------ f-distill
F = {   # f(r) of D_f(p || q) = E_q f(p/q); h = f''(r) r^2 by autograd, in float64
    "reverse_kl": lambda r: -torch.log(r),
    "forward_kl": lambda r: r * torch.log(r),
    "js": lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
    "hellinger": lambda r: 1 - torch.sqrt(r),
    "jeffreys": lambda r: (r - 1) * torch.log(r),
}


@pytest.mark.parametrize("divergence", sorted(F))
def test_f_distill_weights_are_f_second_derivative_times_r_squared(divergence):
    logit = torch.tensor([-7.0, -2.0, -0.3, 0.0, 0.8, 2.5, 9.0])
    r = logit.double().clamp(-5, 5).exp().requires_grad_(True)
    (d1,) = torch.autograd.grad(F[divergence](r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    h = d2 * r.detach() ** 2
    torch.testing.assert_close(f_weight(divergence, logit, 5.0).double(), h / h.mean(),
                               rtol=1e-5, atol=1e-7)
    got = f_weight(divergence, logit, 5.0)
    assert float(got.mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(got[-1]) == float(f_weight(divergence, torch.tensor([*logit[:-1], 5.0]), 5.0)[-1])


def test_f_distill_direction_is_the_dmd_direction_times_the_normalised_weight():
    class Logits(nn.Module):   # a discriminator with known logits per sample
        def forward(self, z, t, y, mode):
            assert mode == "logit"
            return z.flatten(1)[:, 0] * 0 + torch.tensor([-1.0, 0.0, 2.0])

    obj = FDistill(divergence="forward_kl", gan=True, gan_generator_weight=0,
                   gan_critic_weight=0.01)
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, *SHAPE, generator=g) for _ in range(3))
    topo = type("T", (), {"critic": Logits()})
    got = obj.direction(x, real, fake, x, torch.ones(3), None, topo)
    r = torch.tensor([-1.0, 0.0, 2.0], dtype=D).exp()
    dmd = (fake - real).double() / (x - real).double().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(got.double(), dmd * (r / r.mean()).view(-1, 1, 1, 1), rtol=1e-5,
                               atol=1e-6)
    assert obj.batch_coupling and FDistill(divergence="reverse_kl").batch_coupling is None


F_TINY = [*TINY, "trainer.epochs=1", "loss.ratio=2"]


def test_f_distill_reverse_kl_is_dmd2_bit_for_bit_and_js_is_not(tmp_path):
    out = {}
    for name, args in {"dmd2": ["loss=dmd2"],
                       "rkl": ["loss=fdistill", "loss.divergence=reverse_kl"],
                       "js": ["loss=fdistill", "loss.divergence=js"]}.items():
        summary = run(make_cfg([*F_TINY, *args]), tmp_path / name, tty=False)
        assert summary["status"] == "finished" and math.isfinite(summary["best/test/fd@1"])
        out[name] = checkpoint.load(tmp_path / name / "checkpoints" / "last.pt", "t")
    for part in ("model", "critic_model"):
        a, b, c = out["dmd2"][part], out["rkl"][part], out["js"][part]
        assert all(torch.equal(a[k], b[k]) for k in a), part
        assert any(not torch.equal(a[k], c[k]) for k in a), part
    rows = (tmp_path / "js" / "metrics.jsonl").read_text()
    assert "train/log_r" in rows and "train/h_max" in rows


# ------------------------------------------------------------------------------ phased DMD
def test_phased_dmd_draws_every_time_inside_the_phase_it_trains():
    """K = 4 on vp_cosine: phases [0.75, 1], [0.5, 0.75], [0.25, 0.5], [0, 0.25]; the DM loss's
    times (seen by the teacher) and the fake score's (seen by the critic) lie inside the phase
    the step trains, the generator runs at T_0..T_s; phase s joins at step s * phase_steps."""
    proc = build_process("vp_cosine")
    mu_r, v_r, mu_s, v_s = toy(proc, seed=4)
    teacher = gaussian_denoiser(proc, mu_r, v_r).requires_grad_(False)
    student = gaussian_denoiser(proc, mu_s, v_s)
    obj = PhasedDMD(generator_steps=4, phase_steps=3, ratio=1)
    torch.manual_seed(0)
    obj.bind(student, teacher, Data())
    topo = type("T", (), {"model": teacher, "critic": obj.build_critic(teacher)})
    assert [obj.phase_times(proc, s) for s in range(4)] == [
        pytest.approx(p) for p in ((0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25))]
    assert obj.phase_indices(proc, 0) == (750, 980) and obj.phase_indices(proc, 3) == (20, 249)
    stages = []
    for step in range(40):
        for net in (teacher.net, topo.critic.denoiser.net, student.net):
            net.seen.clear()
        terms = obj.step_terms(student, topo, batch_of(4), StepContext(1, step, 40, 40))
        s = int(terms["phase"])
        assert s <= step // 3
        stages.append(s)
        lo, hi = obj.phase_times(proc, s)
        for net in (teacher.net, topo.critic.denoiser.net):
            seen = torch.cat(net.seen)
            assert len(seen) and bool(((seen >= lo - 1e-9) & (seen <= hi + 1e-9)).all()), (s, seen)
        gen = sorted({round(float(v), 9) for v in torch.cat(student.net.seen)}, reverse=True)
        assert gen == pytest.approx([1.0, 0.75, 0.5, 0.25][: s + 1])
    assert set(stages) == {0, 1, 2, 3} and set(stages[:3]) == {0}


# ------------------------------------------------------------------------------ end to end
SID_TINY = [*TINY, "loss=sid", "trainer.epochs=1"]


def test_sid_runs_and_resumes_bit_exactly_with_three_networks(tmp_path):
    full = run(make_cfg(SID_TINY), tmp_path / "full", tty=False)
    assert full["status"] == "finished" and math.isfinite(full["best/test/fd@1"])
    assert full["best/test/steps"] == 1
    with pytest.raises(RunInterrupted):
        run(make_cfg([*SID_TINY, "trainer.stop_at_step=3"]), tmp_path / "cut", tty=False)
    resumed = run(make_cfg([*SID_TINY, "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")
    for part in ("model", "critic_model", "objective"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["critic_optimizer"]["state"], b["critic_optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        for name, value in sa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[k][name])), (k, name)
    assert resumed["best/test/fd"] == full["best/test/fd"]
    rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    for key in ("train/sid", "train/score_gap", "train/critic_dsm", "train/critic_loss"):
        assert key in rows, key


def test_phased_dmd_trains_a_k_step_generator_end_to_end(tmp_path):
    summary = run(make_cfg([*TINY, "loss=phased_dmd", "loss.phase_steps=2", "loss.ratio=1",
                            "trainer.epochs=1"]), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["best/test/steps"] == 4
    assert math.isfinite(summary["best/test/fd"]) and math.isfinite(summary["best/test/fd@1"])
    assert "train/phase" in (tmp_path / "r" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("args,key", [
    (["loss=fdistill", "loss.divergence=renyi"], "loss.divergence"),
    (["loss=fdistill", "loss.gan=false", "loss.gan_generator_weight=0",
      "loss.gan_critic_weight=0"], "loss.gan"),
    (["loss=fdistill", "loss.log_ratio_clip=0"], "loss.log_ratio_clip"),
    (["loss=sid", "loss.alpha=0"], "loss.alpha"),
    (["loss=sid", "loss.alpha=-1.2"], "loss.alpha"),
    (["loss=sid", "loss.loss_scaling=nan"], "loss.loss_scaling"),
    (["loss=sid", "loss.start_sigma=0"], "loss.start_sigma"),
    (["loss=sid", "loss.max_step_percent=1.5"], "loss.min_step_percent"),
    (["loss=phased_dmd", "loss.generator_steps=1"], "loss.generator_steps"),
    (["loss=phased_dmd", "loss.phase_steps=-1"], "loss.phase_steps"),
    (["loss=phased_dmd", "loss.fake_loss.time_sampling=lognormal"],
     "loss.fake_loss.time_sampling"),
    (["loss=phased_dmd", "loss.generator_steps=100"], "loss.generator_steps"),
])
def test_bad_options_are_refused_with_the_key(tmp_path, args, key):
    with pytest.raises(UserError) as err:
        run(make_cfg([*TINY, *args]), tmp_path / "r", tty=False)
    assert err.value.key == key
