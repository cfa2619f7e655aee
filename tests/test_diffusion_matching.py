"""Distribution-matching distillation (DMD, DMD2): the DM gradient against the closed-form
scores of Gaussian data, no gradient when the fake score equals the real one, the critic's
update ratio, exact resume with three networks, the coverage metrics that detect mode collapse,
and refusals."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg
from test_diffusion_task import TINY
from torch import nn

from distill_cli.draws import SampleDraws
from distill_cli.evaluation import sample_quality as q
from distill_cli.losses.base import StepContext
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.models.diffusion.noise import build_process
from distill_cli.runs import checkpoint
from distill_cli.tasks.diffusion.methods.dmd2 import DMD2
from distill_cli.tasks.diffusion.methods.matching import (
    FakeScore,
    GeneratorSchedule,
    dm_direction,
    surrogate_loss,
    time_grid,
)
from distill_cli.training.run import RunInterrupted, run

D = torch.float64


class GaussianPosterior(nn.Module):
    """E[x | z_t] for data x ~ N(mu, v) per pixel, as an x0 backbone (input z, time 1000 t)."""

    def __init__(self, proc, mu, v):
        super().__init__()
        self.proc, self.mu, self.v = proc, mu, v
        self.scale = nn.Parameter(torch.ones((), dtype=D))   # something to train
        self.out = nn.Identity()

    def forward(self, z, time, y):
        t = time.double() / 1000
        a = self.proc.a(t).view(-1, 1, 1, 1)
        s = self.proc.s(t).view(-1, 1, 1, 1)
        mu, v = self.mu * self.scale, self.v
        return mu + a * v * (z - a * mu) / (a * a * v + s * s)


def gaussian_denoiser(proc, mu, v):
    return Denoiser(GaussianPosterior(proc, mu, v), process=proc, param="x0", num_classes=0,
                    conditional=False)


def closed_form_score(proc, z, t, mu, v):
    """grad log p_t(z) for x ~ N(mu, v): z_t ~ N(a mu, a^2 v + s^2)."""
    a, s = proc.a(t).view(-1, 1, 1, 1), proc.s(t).view(-1, 1, 1, 1)
    return -(z - a * mu) / (a * a * v + s * s)


@pytest.mark.parametrize("process", ["vp_cosine", "edm", "flow"])
def test_the_dm_gradient_is_the_score_difference_times_dmd_weight(process):
    """DMD's gradient (s_fake - s_real) * w_t, w_t = (s^2 / a) C S / ||mu_real - x||_1, from the
    closed-form scores of two Gaussians, equals what the surrogate back-propagates into x
    (times B C H W), with mu_real / mu_fake from real Denoisers."""
    proc = build_process(process)
    g = torch.Generator().manual_seed(0)
    mu_r, v_r = torch.randn(1, 1, 2, 2, generator=g, dtype=D) * 0.3, torch.full((1, 1, 2, 2), 0.2,
                                                                                 dtype=D)
    mu_f, v_f = mu_r + 0.4, torch.full((1, 1, 2, 2), 0.35, dtype=D)
    real, fake = gaussian_denoiser(proc, mu_r, v_r), gaussian_denoiser(proc, mu_f, v_f)
    x = (torch.randn(6, 1, 2, 2, generator=g, dtype=D) * 0.5).requires_grad_(True)
    grid = time_grid(proc)
    t = grid[torch.tensor([50, 200, 400, 600, 800, 950])]
    a, s = proc.a(t).view(-1, 1, 1, 1), proc.s(t).view(-1, 1, 1, 1)
    z = a * x.detach() + s * torch.randn(x.shape, generator=g, dtype=D)
    with torch.no_grad():
        mu_real, mu_fake = real.predict(z, t)[0], fake.predict(z, t)[0]
    surrogate_loss(x, dm_direction(x.detach(), mu_real, mu_fake)).backward()
    got = x.grad * x.numel()
    score_diff = closed_form_score(proc, z, t, mu_f, v_f) - closed_form_score(proc, z, t, mu_r,
                                                                              v_r)
    cs = x[0].numel()
    w = (s * s / a) * cs / (mu_real - x.detach()).abs().flatten(1).sum(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(got.double(), (score_diff * w).float().double(), rtol=1e-5,
                               atol=1e-6)


def test_equal_fake_and_real_scores_give_the_generator_no_gradient():
    """Right after bind, the fake score is an exact copy of the teacher: DMD2 without its GAN
    gives every generator parameter a zero gradient, whatever the noise."""
    proc = build_process("vp_cosine")
    mu, v = torch.zeros(1, 1, 2, 2, dtype=D), torch.full((1, 1, 2, 2), 0.3, dtype=D)
    teacher = gaussian_denoiser(proc, mu + 0.2, v).requires_grad_(False)
    student = gaussian_denoiser(proc, mu + 0.5, v)   # x = G(z) = 0.5 scale at t_max

    class Data:
        input_shape = (1, 2, 2)
    obj = DMD2(gan=False, gan_generator_weight=0, gan_critic_weight=0, ratio=1)
    torch.manual_seed(0)
    obj.bind(student, teacher, Data())

    class Topology:
        model = teacher
        critic = obj.build_critic(teacher)
    batch = type("B", (), {"index": torch.arange(8), "x": torch.zeros(8, 1, 2, 2, dtype=D),
                           "y": torch.zeros(8, dtype=torch.long)})()
    terms = obj.step_terms(student, Topology, batch, StepContext(1, 0, 10, 10))
    terms["loss"].backward()
    assert student.net.scale.grad is not None and float(student.net.scale.grad) == 0.0
    assert float(terms["dm_grad"]) == 0.0
    # and a perturbed fake score does move it
    with torch.no_grad():
        Topology.critic.denoiser.net.scale.mul_(1.5)
    student.net.scale.grad = None
    obj.step_terms(student, Topology, batch, StepContext(1, 1, 10, 10))["loss"].backward()
    assert abs(float(student.net.scale.grad)) > 0


def test_backward_simulation_runs_the_current_generator_through_earlier_steps():
    """K = 4: stage s trains at grid(4)[s] on an input the generator itself made from pure
    noise through stages 0..s-1 (re-noised with fresh draws), the same for each sample whatever
    its batch; s is a function of (seed, step)."""
    proc = build_process("vp_cosine")
    mu, v = torch.full((1, 1, 2, 2), 0.1, dtype=D), torch.full((1, 1, 2, 2), 0.3, dtype=D)
    gen = gaussian_denoiser(proc, mu, v)
    sched = GeneratorSchedule(4)
    sched.configure(gen, gen)
    assert gen.resolved_sampler == "consistency" and gen.steps == 4
    times = sched.times(gen)
    assert times == pytest.approx([1.0, 0.75, 0.5, 0.25])
    stages = {sched.stage(7, k) for k in range(64)}
    assert stages == {0, 1, 2, 3} and sched.stage(7, 5) == sched.stage(7, 5)
    batch = type("B", (), {"index": torch.arange(3), "x": torch.zeros(3, 1, 2, 2, dtype=D),
                           "y": None})()
    x, t = sched.samples(gen, batch, SampleDraws(1, 2, batch.index, "cpu"), 2, grad=False)
    assert torch.all(t == 0.5)
    # by hand: the same draws, in the documented order
    draws = SampleDraws(1, 2, batch.index, "cpu")
    z = proc.s(torch.tensor(1.0, dtype=D)) * draws.normal(1, 2, 2)
    for k in range(2):
        x_k = gen.predict(z, times[k])[0]
        u = torch.tensor(times[k + 1], dtype=D)
        z = proc.a(u) * x_k + proc.s(u) * draws.normal(1, 2, 2)
    torch.testing.assert_close(x, gen.predict(z, 0.5)[0].float())
    # sample 1 alone draws what it drew inside the batch
    one = type("B", (), {"index": torch.tensor([1]), "x": torch.zeros(1, 1, 2, 2, dtype=D),
                         "y": None})()
    x1, _ = sched.samples(gen, one, SampleDraws(1, 2, one.index, "cpu"), 2, grad=False)
    torch.testing.assert_close(x1[0], x[1])


def test_the_gan_head_reads_the_fake_scores_bottleneck():
    from distill_cli.config.build import build_model
    from distill_cli.data.fake import build as fake
    data = fake(shape=[1, 8, 8], num_classes=10, train_size=8, test_size=4)
    teacher = build_model(make_cfg(["recipe=diffusion_digits", "teacher.channels=8"]).teacher,
                          "teacher", data).requires_grad_(False)
    critic = FakeScore(teacher, (1, 8, 8), gan=True)
    z = torch.randn(4, 1, 8, 8)
    logit = critic(z, torch.full((4,), 0.5), None, "logit")
    assert logit.shape == (4,)
    logit.sum().backward()   # the discriminator trains the fake score's trunk too (DMD2)
    assert critic.head.body[0].weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in critic.denoiser.net.parameters())
    assert all(p.requires_grad for p in critic.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------ end to end
DMD2_TINY = [*TINY, "loss=dmd2", "loss.ratio=3", "trainer.epochs=1"]


def _weights(path):
    ck = checkpoint.load(path, "t")
    return ck["model"], ck["critic_model"], ck


def test_the_critic_steps_every_step_and_the_generator_every_ratio_th(tmp_path):
    """loss.ratio=3: the generator's weights change at steps 1, 4 (0-based 0, 3), the critic's
    at every step (DMD2's dfake_gen_update_ratio)."""
    snaps = []
    for k in range(1, 6):
        with pytest.raises(RunInterrupted):
            run(make_cfg([*DMD2_TINY, f"trainer.stop_at_step={k}"]), tmp_path / f"s{k}",
                tty=False)
        snaps.append(_weights(tmp_path / f"s{k}" / "checkpoints" / "last.pt"))
    for k in range(1, 5):
        (g0, c0, _), (g1, c1, _) = snaps[k - 1], snaps[k]
        gen_moved = any(not torch.equal(g0[n], g1[n]) for n in g0)
        critic_moved = any(not torch.equal(c0[n], c1[n]) for n in c0)
        assert critic_moved, k
        assert gen_moved == (k % 3 == 0), k   # step index k (0-based) trained the generator


def test_dmd2_resumes_bit_exactly_with_three_networks(tmp_path):
    full = run(make_cfg(DMD2_TINY), tmp_path / "full", tty=False)
    assert full["status"] == "finished" and math.isfinite(full["best/test/fd"])
    assert full["best/test/steps"] == 1 and full["teacher/outputs"] == "live"
    with pytest.raises(RunInterrupted):
        run(make_cfg([*DMD2_TINY, "trainer.stop_at_step=4"]), tmp_path / "cut", tty=False)
    resumed = run(make_cfg([*DMD2_TINY, "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")
    for part in ("model", "critic_model", "objective"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["critic_optimizer"]["state"].keys() == b["critic_optimizer"]["state"].keys()
    assert resumed["best/test/fd"] == full["best/test/fd"]
    rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    for key in ("train/critic_loss", "train/critic_dsm", "train/critic_gan", "train/gan_g",
                "train/gen_turn"):
        assert key in rows, key


def test_dmd_regresses_onto_stored_pairs_in_feature_space(tmp_path):
    summary = run(make_cfg([*TINY, "loss=dmd", "trainer.epochs=1"]), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and math.isfinite(summary["best/test/fd@1"])
    rows = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "train/reg" in rows and "train/critic_dsm" in rows


@pytest.mark.parametrize("args,key", [
    (["loss=dmd2", "trainer.precision=fp16"], "trainer.precision"),
    (["loss=dmd", "loss.generator_steps=2"], "loss.generator_steps"),
    (["loss=dmd", "loss.reg_distance=lpips"], "loss.reg_distance"),
    (["loss=dmd2", "loss.gan=false"], "loss.gan"),
    (["loss=dmd2", "loss.ratio=0"], "loss.ratio"),
    (["loss=dmd2", "loss.min_step_percent=0.9", "loss.max_step_percent=0.1"],
     "loss.min_step_percent"),
])
def test_bad_matching_options_are_refused_with_the_key(tmp_path, args, key):
    from distill_cli.errors import UserError
    with pytest.raises(UserError) as err:
        run(make_cfg([*TINY, *args]), tmp_path / "r", tty=False)
    assert err.value.key == key


# ------------------------------------------------------------------------------ collapse
def test_coverage_metrics_detect_a_collapsed_generator():
    """On an 8-mode 2-D Gaussian mixture, samples from every mode keep recall and the class
    entropy near their maxima; samples from one mode (a collapsed generator, still 'precise')
    lose both — what the table's recall / class_entropy columns measure."""
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = torch.stack([angles.cos(), angles.sin()], 1) * 4

    def mixture(n, modes):
        k = modes[torch.randint(0, len(modes), (n,), generator=g)]
        return centres[k] + 0.3 * torch.randn(n, 2, generator=g)

    def logits(x):   # a classifier that knows the modes
        return -torch.cdist(x, centres) ** 2

    real = mixture(2000, torch.arange(8))
    spread = mixture(1000, torch.arange(8))
    collapsed = mixture(1000, torch.tensor([3]))
    p_s, r_s = q.precision_recall(real, spread, 3)
    p_c, r_c = q.precision_recall(real, collapsed, 3)
    assert p_s > 0.9 and p_c > 0.9          # both precise
    assert r_s > 0.9 and r_c < 0.2          # only one covers the data
    h_s, h_c = q.class_entropy(logits(spread), 8), q.class_entropy(logits(collapsed), 8)
    assert h_s > 0.95 and h_c < 0.05          # normalised: 1 = every class alike
    assert q.frechet_distance(real, collapsed) > 10 * q.frechet_distance(real, spread)
