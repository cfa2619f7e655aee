"""loss=gkd_onpolicy (on-policy GKD, TRL's GKDTrainer): GPT.generate's per-row generators and
one-past-the-context decoding against a float64 full-recomputation reference; the on-policy
step's tokens (the student's own generate) and loss (a float64 reference); λ = 0 is loss=gkd,
λ = 1 always samples; the coin and the samples are a pure function of (noise_seed, step, sample)
and survive a checkpoint; a run ends with the LM metrics and resumes bit-exactly; bad options
are refused with their key (exit 2 from the CLI)."""
from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_cli import refused

from distill_cli.config import build
from distill_cli.config.paths import CONF_DIR
from distill_cli.data.bundle import Batch
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext
from distill_cli.models.gpt import GPT
from distill_cli.runs import checkpoint
from distill_cli.seeding import derive_seed
from distill_cli.tasks.lm.methods.gkd import GKD
from distill_cli.tasks.lm.methods.onpolicy import SAMPLE_TAG, OnPolicyGKD
from distill_cli.tasks.lm.task import LMTask
from distill_cli.teachers.topology import FrozenTeacher
from distill_cli.training.run import RunInterrupted, run

TINY = ["recipe=lm_stdlib_tiny", "logger=none", "dataset.block_size=32",
        "dataset.limit_train=96", "dataset.limit_eval=24", "trainer.epochs=2",
        "trainer.batch_size=16", "teacher.train.epochs=1", "teacher.d_model=32",
        "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16", "student.n_heads=2",
        "student.n_layers=1", "trainer.log_every_n_steps=2", "loss=gkd_onpolicy",
        "loss.prompt_tokens=8"]
P, B = 8, 6


def sharpen(model: GPT, factor: float) -> GPT:
    with torch.no_grad():   # sharper than the N(0, 0.02) init: sampling means something
        model.lm_head.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def lm():
    """(data, student, teacher, T): GPTs with random weights built by the task (no training)."""
    cfg = make_cfg(TINY)
    data = build.build_data(cfg.dataset)
    torch.manual_seed(0)
    teacher = sharpen(LMTask().build_model(cfg.teacher, "teacher", data).eval(), 40)
    student = sharpen(LMTask().build_model(cfg.student, "student", data), 30)
    return data, student, teacher, int(data.input_shape[-1])


def first_batch(data, n=B) -> Batch:
    return next(iter(data.train.train_batches(n, 0, 1)))


def bound(data, student, teacher, seed=0, **opts) -> OnPolicyGKD:
    obj = OnPolicyGKD(prompt_tokens=P, **opts)
    torch.manual_seed(seed)   # as the runner: the noise key comes from the seeded RNG
    obj.bind(student, teacher, data)
    return obj


def ctx(step: int) -> StepContext:
    return StepContext(epoch=1, step=step, steps_per_epoch=6, total_steps=12)


def row_generators(seed: int, step: int, index) -> list[torch.Generator]:
    """The documented per-sample generators, rebuilt here (not read from the objective)."""
    return [torch.Generator().manual_seed(derive_seed(SAMPLE_TAG, seed, step, int(i)))
            for i in index]


# ------------------------------------------------------------------ GPT.generate's additions
def naive_rows(model: GPT, prompts, n, temperature, top_k, seeds):
    """Float64 reference: no cache (the whole prefix recomputed each token, at most the
    context), row i's inverse CDF at the uniforms of its own generator."""
    m = copy.deepcopy(model).double().eval()
    u = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s),
                                dtype=torch.float64) for s in seeds])
    seq = prompts.clone()
    with torch.no_grad():
        for j in range(n):
            z = m(seq)[:, -1] / temperature
            if top_k is not None:
                z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], float("-inf"))
            cdf = torch.softmax(z, -1).cumsum(-1)
            tok = torch.stack([(cdf[i] <= u[i, j] * cdf[i, -1]).sum() for i in range(len(seq))])
            seq = torch.cat([seq, tok[:, None]], 1)
    return seq


@pytest.mark.parametrize("top_k", [None, 5])
def test_per_row_generators_sample_each_row_from_its_own_stream(lm, top_k):
    _, student, _, _ = lm
    model = copy.deepcopy(student).double()
    prompts = torch.randint(0, model.vocab_size, (4, 3), generator=torch.Generator().manual_seed(2))
    seeds = [11, 12, 13, 14]

    def gens(s=seeds):
        return [torch.Generator().manual_seed(x) for x in s]

    out = model.generate(prompts, 10, temperature=0.8, top_k=top_k, generator=gens())
    assert torch.equal(out, naive_rows(model, prompts, 10, 0.8, top_k, seeds))
    assert torch.equal(out, model.generate(prompts, 10, temperature=0.8, top_k=top_k,
                                           generator=gens()))      # same seeds, same tokens
    # a row's tokens depend on its own prompt and generator only (torchrun: other batch-mates)
    for i in range(4):
        alone = model.generate(prompts[i:i + 1], 10, temperature=0.8, top_k=top_k,
                               generator=gens([seeds[i]]))
        assert torch.equal(alone, out[i:i + 1])
    swapped = model.generate(prompts, 10, temperature=0.8, top_k=top_k,
                             generator=gens([21, 12, 13, 14]))
    assert torch.equal(swapped[1:], out[1:]) and not torch.equal(swapped[0], out[0])
    greedy = model.generate(prompts, 10, temperature=0.0, generator=gens())
    assert torch.equal(greedy, model.generate(prompts, 10, temperature=0.0))


def test_last_unfed_fills_one_position_past_the_context(lm):
    _, student, _, T = lm
    model = copy.deepcopy(student).double()
    prompts = torch.randint(0, model.vocab_size, (3, P), generator=torch.Generator().manual_seed(4))
    seeds = [1, 2, 3]
    out = model.generate(prompts, T + 1 - P, temperature=1.0, last_unfed=True,
                         generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert out.shape == (3, T + 1)           # a full block: x = out[:, :-1], y = out[:, 1:]
    assert torch.equal(out, naive_rows(model, prompts, T + 1 - P, 1.0, None, seeds))
    with pytest.raises(ValueError, match=r"context length 32 \+ 1"):
        model.generate(prompts, T + 2 - P, last_unfed=True)
    with pytest.raises(ValueError, match="longer than the model's context length 32$"):
        model.generate(prompts, T + 1 - P)   # without the option: refused as before
    with pytest.raises(ValueError, match="one torch.Generator per prompt row"):
        model.generate(prompts, 2, generator=[torch.Generator()])


# ------------------------------------------------------------------ the on-policy step
def jsd_reference(s_logits, t_logits, y, beta):
    """Float64 loops over the definition: mean over counted positions of
    β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q, p = teacher, q = student."""
    total, n = 0.0, 0
    for b in range(y.shape[0]):
        for j in range(y.shape[1]):
            if int(y[b, j]) == -100:
                continue
            zs, zt = [float(v) for v in s_logits[b, j]], [float(v) for v in t_logits[b, j]]
            ls, lt = math.log(sum(map(math.exp, zs))), math.log(sum(map(math.exp, zt)))
            q = [math.exp(v - ls) for v in zs]
            p = [math.exp(v - lt) for v in zt]
            m = [beta * a + (1 - beta) * c for a, c in zip(p, q)]
            total += beta * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0) \
                + (1 - beta) * sum(a * math.log(a / c) for a, c in zip(q, m) if a > 0)
            n += 1
    return total / n, n


def test_on_policy_step_scores_the_students_own_samples(lm):
    data, student, teacher, T = lm
    obj = bound(data, student, teacher, lmbda=1.0, beta=0.3, sampling_temperature=0.9)
    batch = first_batch(data)
    y_data = batch.y.clone()
    y_data[1, 2:] = -100          # block 1 ends inside its prompt (the split's padded last block)
    batch = batch._replace(y=y_data)
    step = 3
    terms = obj.step_terms(student, teacher, batch, ctx(step))
    assert set(terms) == {"loss", "on_policy", "gen_tokens"} and float(terms["on_policy"]) == 1.0

    # the tokens: the student's own generate with the documented per-sample generators
    seq = student.generate(batch.x[:, :P], T + 1 - P, temperature=0.9, last_unfed=True,
                           generator=row_generators(obj.seed(), step, batch.index))
    assert torch.equal(seq[:, :P], batch.x[:, :P])
    x, y = obj.sample(student, batch, step)
    assert torch.equal(x, seq[:, :-1]) and torch.equal(y[0, P - 1:], seq[0, P:])
    assert (y[:, :P - 1] == -100).all() and (y[1] == -100).all()
    assert not torch.equal(x[:, P:], batch.x[:, P:])     # not the corpus

    # the loss: float64 reference over the generated positions, from the same logits
    with torch.no_grad():
        want, n = jsd_reference(student(x).double(), teacher(x).double(), y, 0.3)
    assert n == (B - 1) * (T + 1 - P) == float(terms["gen_tokens"])
    assert float(terms["loss"].detach()) == pytest.approx(want, rel=1e-5)
    terms["loss"].backward()                 # the gradient reaches the student
    assert any(p.grad is not None and bool(p.grad.ne(0).any()) for p in student.parameters())
    student.zero_grad(set_to_none=True)


def test_a_samples_tokens_do_not_depend_on_its_batch_mates(lm):
    """What torchrun needs: a rank holding a slice of the global batch samples the same tokens
    for those blocks as one process does."""
    data, student, teacher, _ = lm
    obj = bound(data, student, teacher, lmbda=1.0)
    batch = first_batch(data)
    x, y = obj.sample(student, batch, 5)
    half = Batch(batch.index[3:], batch.x[3:], batch.y[3:])
    x2, y2 = obj.sample(student, half, 5)
    assert torch.equal(x2, x[3:]) and torch.equal(y2, y[3:])
    x3, _ = obj.sample(student, batch, 6)    # the next step draws other tokens
    assert not torch.equal(x3, x)


def test_lambda_zero_is_plain_gkd_on_the_same_batch(lm):
    data, student, teacher, _ = lm
    batch = first_batch(data)
    topo = FrozenTeacher(teacher)

    def grads(objective, step):
        s = copy.deepcopy(student)
        terms = objective.train_terms(s, s, topo, batch, ctx(step))
        terms["loss"].backward()
        return terms, [p.grad.clone() for p in s.parameters()]

    obj = bound(data, student, teacher, lmbda=0.0, beta=0.7)
    plain = GKD(beta=0.7)
    for step in range(4):
        a, ga = grads(obj, step)
        b, gb = grads(plain, step)
        assert float(a["on_policy"]) == 0.0 and float(a["gen_tokens"]) == 0.0
        assert torch.equal(a["loss"], b["loss"])
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_lambda_one_always_samples_and_the_coin_is_seeded(lm):
    data, student, teacher, _ = lm
    always = bound(data, student, teacher, lmbda=1.0)
    assert all(always.on_policy(step) for step in range(500))
    half = bound(data, student, teacher, seed=0, lmbda=0.5)
    coins = [half.on_policy(step) for step in range(400)]
    assert 0.4 < sum(coins) / len(coins) < 0.6          # a fair coin, flipped per step
    assert coins == [half.on_policy(step) for step in range(400)]   # pure function of the step
    other = bound(data, student, teacher, seed=1, lmbda=0.5)
    assert coins != [other.on_policy(step) for step in range(400)]   # keyed by the run's seed
    rare = bound(data, student, teacher, seed=0, lmbda=0.1)
    assert 0.05 < sum(rare.on_policy(s) for s in range(400)) / 400 < 0.15


def test_the_noise_key_survives_a_checkpoint(lm):
    """Resume: a fresh objective (another RNG state) loaded from the state dict flips the same
    coins and draws the same samples."""
    data, student, teacher, _ = lm
    obj = bound(data, student, teacher, seed=3, lmbda=0.5)
    state = obj.state_dict()
    assert "noise_seed" in state
    fresh = bound(data, student, teacher, seed=99, lmbda=0.5)
    assert [fresh.on_policy(s) for s in range(64)] != [obj.on_policy(s) for s in range(64)]
    fresh.load_state_dict(state)
    assert [fresh.on_policy(s) for s in range(64)] == [obj.on_policy(s) for s in range(64)]
    batch = first_batch(data)
    assert torch.equal(fresh.sample(student, batch, 7)[0], obj.sample(student, batch, 7)[0])


def test_yaml_builds_the_class_with_its_defaults():
    cfg = OmegaConf.load(Path(CONF_DIR) / "loss" / "gkd_onpolicy.yaml")
    objective = instantiate(cfg)
    assert type(objective) is OnPolicyGKD and objective.task_name == "lm"
    opts = OmegaConf.to_container(cfg, resolve=True)
    assert opts.pop("_target_") == "distill_cli.tasks.lm.methods.onpolicy.OnPolicyGKD"
    params = {k: p.default for k, p in inspect.signature(OnPolicyGKD.__init__).parameters.items()
              if k != "self"}
    assert opts == params
    assert (objective.lmbda, objective.sampling_temperature, objective.gkd.beta) == (0.5, 0.9, 0.5)


# ------------------------------------------------------------------ runs
def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_samples_on_policy_and_reports_the_lm_metrics(tmp_path):
    summary = run(make_cfg(TINY), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["task"] == "lm"
    assert summary["loss"] == "OnPolicyGKD"
    for key in ("best/test/ppl", "best/test/acc1", "best/test/agreement", "best/test/token_kl",
                "teacher/test/ppl"):
        assert math.isfinite(summary[key]), key
    assert summary["best/test/ppl"] < 258   # better than a uniform guess over the bytes
    rows = metric_rows(tmp_path / "r")
    on = [r["train/on_policy"] for r in rows]
    assert all(0 < f < 1 for f in on)      # both kinds of steps ran (λ = 0.5, seed 0)
    for r in rows:   # 16 blocks x (33 - 8) generated tokens per on-policy step
        assert r["train/gen_tokens"] == pytest.approx(r["train/on_policy"] * 16 * 25)
    assert (tmp_path / "r" / "samples_best.txt").exists()


def test_resume_after_an_interruption_is_bit_exact(tmp_path):
    run(make_cfg(TINY), tmp_path / "full", tty=False)
    with pytest.raises(RunInterrupted):
        run(make_cfg([*TINY, "trainer.stop_at_step=5"]), tmp_path / "cut", tty=False)
    run(make_cfg([*TINY, "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["objective"]["noise_seed"], b["objective"]["noise_seed"])
    coins = [(r["train/on_policy"], r["train/gen_tokens"]) for r in metric_rows(tmp_path / "full")]
    assert coins == [(r["train/on_policy"], r["train/gen_tokens"])
                     for r in metric_rows(tmp_path / "cut")]


def test_a_run_with_lambda_zero_trains_exactly_as_loss_gkd(tmp_path):
    run(make_cfg([*TINY, "loss.lmbda=0"]), tmp_path / "onp", tty=False)
    run(make_cfg([*TINY[:-2], "loss=gkd"]), tmp_path / "gkd", tty=False)
    a = checkpoint.load(tmp_path / "onp" / "checkpoints" / "last.pt", "t")["model"]
    b = checkpoint.load(tmp_path / "gkd" / "checkpoints" / "last.pt", "t")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides,key", [
    (["loss.prompt_tokens=32"], "loss.prompt_tokens"),          # = dataset.block_size
    (["loss.prompt_tokens=0"], "loss.prompt_tokens"),
    (["loss.lmbda=1.5"], "loss.lmbda"),
    (["loss.lmbda=-0.1"], "loss.lmbda"),
    (["loss.sampling_temperature=-0.5"], "loss.sampling_temperature"),
    (["loss.top_k=0"], "loss.top_k"),
    (["loss.beta=2"], "loss.beta"),
    (["teacher.outputs=store"], "teacher.outputs"),               # the samples change every step
])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(UserError) as info:
        run(make_cfg([*TINY, *overrides]), tmp_path / "r", tty=False)
    assert info.value.key == key and info.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_teacher_with_another_vocabulary_is_refused(lm):
    data, student, teacher, _ = lm
    other = GPT(teacher.vocab_size + 5, teacher.block_size, 16, 1, 2, 32, "rope", 0.0, True,
                False)
    with pytest.raises(UserError) as info:
        OnPolicyGKD(prompt_tokens=P).bind(student, other, data)
    assert info.value.key == "teacher" and "tokenizer" in info.value.fix
    with pytest.raises(UserError) as info:     # a student that cannot sample
        OnPolicyGKD(prompt_tokens=P).bind(torch.nn.Linear(3, 3), teacher, data)
    assert info.value.key == "student"


def test_the_cli_refuses_a_negative_sampling_temperature_with_exit_2(tmp_path):
    said = refused([*TINY, "loss.sampling_temperature=-1"], tmp_path,   # exit 2, no traceback
                   "loss.sampling_temperature")
    assert said.startswith("error:") and "Configkey:`loss.sampling_temperature`" in said
