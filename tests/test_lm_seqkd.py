"""loss=seqkd (Kim & Rush sequence-level KD): the teacher's continuations of the training blocks
are generated once into the output store (teachers/sequences.py) and equal the live teacher's
generate, greedy and seeded sampling; the loss matches a float64 reference; a run ends with the
LM metrics and resumes bit-exactly; bad options are refused with their key."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from distill_cli.config import build
from distill_cli.errors import UserError
from distill_cli.runs import checkpoint
from distill_cli.seeding import derive_seed
from distill_cli.tasks.lm.methods.seqkd import SeqKD
from distill_cli.tasks.lm.task import LMTask
from distill_cli.teachers.samples import teacher_samples
from distill_cli.teachers.sequences import teacher_sequences
from distill_cli.training.run import RunInterrupted, run

from conftest import make_cfg
from test_cli import refused

TINY = ["recipe=lm_stdlib_tiny", "logger=none", "dataset.block_size=32",
        "dataset.limit_train=96", "dataset.limit_eval=24", "trainer.epochs=2",
        "trainer.batch_size=16", "teacher.train.epochs=1", "teacher.d_model=32",
        "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16", "student.n_heads=2",
        "student.n_layers=1", "trainer.log_every_n_steps=2", "loss=seqkd",
        "loss.sequences.prompt_tokens=8"]
P, CHUNK = 8, 16


@pytest.fixture(scope="module")
def lm():
    """(data, a GPT teacher with random weights, T): decoding needs no trained teacher."""
    cfg = make_cfg(TINY)
    data = build.build_data(cfg.dataset)
    torch.manual_seed(0)
    teacher = LMTask().build_model(cfg.teacher, "teacher", data).eval()
    with torch.no_grad():   # sharper logits than the N(0, 0.02) init: decoding means something
        teacher.lm_head.weight.mul_(40)
    return data, teacher, int(data.input_shape[-1])


def longer_context(teacher, T):
    """The teacher allowed T + 1 positions: `generate` refuses T0 + n > its context (so its
    result can be scored by one forward) though the last token's position is never fed."""
    long = copy.deepcopy(teacher)
    long.block_size = T + 1
    return long


def live_rows(teacher, data, T, **sampling):
    """The live teacher's generate over the same chunks of CHUNK blocks, the documented
    generator per chunk when sampling."""
    long, rows = longer_context(teacher, T), []
    for c, start in enumerate(range(0, len(data.train), CHUNK)):
        prompts = data.train.x[start:start + CHUNK, :P]
        g = None
        if sampling:
            g = torch.Generator().manual_seed(derive_seed("sequences", sampling["seed"], c))
        rows.append(long.generate(prompts, T + 1 - P, temperature=sampling.get("temperature", 0),
                                  top_k=sampling.get("top_k"), generator=g))
    return torch.cat(rows)


def test_stored_greedy_sequences_equal_the_live_teacher_and_are_computed_once(tmp_path, lm):
    data, teacher, T = lm
    first = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P,
                              batch_size=CHUNK)
    again = teacher_samples("sequences", teacher, data, store_root=str(tmp_path),
                            prompt_tokens=P, seed=5, batch_size=64)   # greedy: seed/batch unkeyed
    assert first.built and not again.built and first.key == again.key
    assert (tmp_path / "outputs" / first.key / "sequences.npy").exists()
    n = len(data.train)
    index = torch.arange(n)
    stored = again.get(index)
    assert stored.dtype == torch.int64 and stored.shape == (n, T + 1)
    assert torch.equal(stored[:, :P], data.train.x[:, :P])      # the blocks' own prompts
    assert torch.equal(stored, live_rows(teacher, data, T))
    # the first T tokens are the unmodified teacher's own generate (its context is T)
    assert torch.equal(stored[:CHUNK, :T], teacher.generate(data.train.x[:CHUNK, :P], T - P,
                                                            temperature=0.0))
    assert not torch.equal(stored[:, P:], data.train.y[:, P - 1:])   # not the corpus itself
    assert torch.equal(again.get(torch.tensor([7, 3])), stored[[7, 3]])
    other = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P + 1)
    assert other.built and other.key != first.key              # the prompt length is keyed


def test_stored_sampled_sequences_are_the_seeded_generate_of_each_chunk(tmp_path, lm):
    data, teacher, T = lm
    opts = {"temperature": 1.0, "top_k": 20, "seed": 3}
    first = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P,
                              batch_size=CHUNK, **opts)
    again = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P,
                              batch_size=CHUNK, **opts)
    assert first.built and not again.built and first.key == again.key
    stored = again.get(torch.arange(len(data.train)))
    assert torch.equal(stored, live_rows(teacher, data, T, **opts))
    greedy = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P)
    reseeded = teacher_sequences(teacher, data, store_root=str(tmp_path), prompt_tokens=P,
                                 batch_size=CHUNK, **{**opts, "seed": 4})
    for other in (greedy, reseeded):
        assert other.key != first.key
        assert not torch.equal(other.get(torch.arange(len(data.train))), stored)


# ------------------------------------------------------------------------------- the loss
def reference(logits, seq, block_y, count_prompt, data_logits=None, data_y=None, weight=0.0):
    """Float64 loops over the definition: CE on the teacher's tokens (positions j >= P - 1),
    none of a block whose prompt reaches padding; the prompt positions with the block's own
    targets when count_prompt; + weight * CE on the real block."""
    def nll(row, tok):
        row = [float(v) for v in row]
        return math.log(sum(math.exp(v) for v in row)) - row[tok]

    total, n = 0.0, 0
    B, T = block_y.shape
    for b in range(B):
        padded = any(int(block_y[b, j]) == -100 for j in range(P - 1))
        for j in range(T):
            if j < P - 1:
                tok = int(block_y[b, j]) if count_prompt else -100
            else:
                tok = -100 if padded else int(seq[b, j + 1])
            if tok != -100:
                total, n = total + nll(logits[b, j], tok), n + 1
    loss = total / n
    if weight:
        d_total = d_n = 0
        for b in range(B):
            for j in range(T):
                if int(data_y[b, j]) != -100:
                    d_total, d_n = d_total + nll(data_logits[b, j], int(data_y[b, j])), d_n + 1
        loss += weight * d_total / d_n
    return loss


@pytest.mark.parametrize("count_prompt,weight", [(False, 0.0), (True, 0.0), (False, 0.7),
                                                 (True, 1.5)])
def test_loss_matches_a_float64_reference(count_prompt, weight):
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 12, 9
    seq = torch.randint(0, V, (B, T + 1), generator=g)
    block_y = torch.randint(0, V, (B, T), generator=g)
    block_y[1, 4:] = -100          # block 1 ends inside its prompt (the split's last block)
    block_y[2, 10:] = -100         # block 2 ends after it
    obj = SeqKD(count_prompt=count_prompt, data_weight=weight,
                sequences={"prompt_tokens": P})
    x, y = obj.sequence_batch(seq, block_y)
    assert torch.equal(x, seq[:, :-1])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    data_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    terms = obj.terms(logits, y, data_logits, block_y)
    want = reference(logits.detach(), seq, block_y, count_prompt, data_logits, block_y, weight)
    assert float(terms["loss"].detach()) == pytest.approx(want, rel=1e-12)
    assert ("data_ce" in terms) == (weight > 0)
    terms["loss"].backward()
    assert bool(logits.grad[1, P - 1:].eq(0).all())   # a padded prompt: nothing counts there
    assert bool(logits.grad[0, P - 1:].ne(0).any())


def test_train_terms_read_the_stored_rows_in_one_student_forward(lm):
    data, teacher, T = lm

    class Rows:   # the served interface over a fixed tensor
        def __init__(self, ids):
            self.ids = ids

        def get(self, index):
            return self.ids[index]

    student = copy.deepcopy(teacher)
    seq = torch.randint(0, data.num_classes, (len(data.train), T + 1))
    batch = next(iter(data.train.train_batches(CHUNK, 0, 1)))
    calls = []
    obj = SeqKD(data_weight=0.5, sequences={"prompt_tokens": P})
    obj.use_samples(Rows(seq))
    terms = obj.train_terms(student, lambda ids: calls.append(ids.shape) or student(ids),
                            None, batch, None)
    assert calls == [(2 * CHUNK, T)]
    with torch.no_grad():
        want = reference(student(seq[batch.index, :-1]), seq[batch.index], batch.y, False,
                         student(batch.x), batch.y, 0.5)
    assert float(terms["loss"].detach()) == pytest.approx(want, rel=1e-5)   # float32 logits


# ------------------------------------------------------------------------------- runs
def test_a_run_reports_the_lm_metrics_and_builds_the_sequences_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    summary = run(make_cfg(TINY), tmp_path / "r", tty=False)
    assert summary["status"] == "finished" and summary["task"] == "lm"
    assert summary["loss"] == "SeqKD"
    for key in ("best/test/ppl", "best/test/acc1", "best/test/agreement", "best/test/token_kl",
                "teacher/test/ppl"):
        assert math.isfinite(summary[key]), key
    assert summary["best/test/ppl"] < 258   # better than a uniform guess over the bytes
    tables = list((tmp_path / "home").glob("outputs/*/sequences.npy"))
    assert len(tables) == 1
    stamp = tables[0].stat().st_mtime_ns
    # another student: a hit; with stored teacher outputs, only the evaluation references are
    # stored (the teacher's per-step logits are never read, so no training table is computed)
    run(make_cfg([*TINY, "seed=1", "teacher.outputs=store"]), tmp_path / "r1", tty=False)
    assert list((tmp_path / "home").glob("outputs/*/sequences.npy")) == tables
    assert tables[0].stat().st_mtime_ns == stamp
    stored = sorted(p.name for p in (tmp_path / "home").glob("outputs/*/*.npy"))
    assert stored == ["sequences.npy", "test.npy", "val.npy"]
    assert (tmp_path / "r" / "samples_best.txt").exists()


def test_resume_after_an_interruption_is_bit_exact(tmp_path):
    args = [*TINY, "loss.data_weight=0.5"]
    run(make_cfg(args), tmp_path / "full", tty=False)
    with pytest.raises(RunInterrupted):
        run(make_cfg([*args, "trainer.stop_at_step=5"]), tmp_path / "cut", tty=False)
    run(make_cfg([*args, "trainer.resume=auto"]), tmp_path / "cut", tty=False)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt", "t")["model"]
    b = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last.pt", "t")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,key", [
    (["loss.sequences.prompt_tokens=32"], "loss.sequences.prompt_tokens"),   # = block size
    (["loss.sequences.prompt_tokens=0"], "loss.sequences.prompt_tokens"),
    (["loss.sequences.temperature=-0.5"], "loss.sequences.temperature"),
    (["loss.sequences.top_k=0"], "loss.sequences.top_k"),
    (["+loss.sequences.beam=5"], "loss.sequences.beam"),                     # not an option
    (["loss.count_prompt=maybe"], "loss.count_prompt"),
    (["loss.data_weight=-1"], "loss.data_weight"),
])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(UserError) as info:
        run(make_cfg([*TINY, *overrides]), tmp_path / "r", tty=False)
    assert info.value.key == key and info.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_prompt_as_long_as_the_block_is_refused_before_any_teacher_is_trained(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as info:
        run(make_cfg([*TINY, "loss.sequences.prompt_tokens=32"]), tmp_path / "r", tty=False)
    assert info.value.key == "loss.sequences.prompt_tokens"
    assert not (tmp_path / "home" / "teachers").exists()


def test_a_teacher_that_is_not_a_language_model_is_refused(lm, tmp_path):
    data, _, _ = lm
    with pytest.raises(UserError) as info:
        teacher_sequences(torch.nn.Linear(3, 3), data, store_root=str(tmp_path))
    assert info.value.key == "teacher"


def test_the_cli_refuses_a_negative_temperature_with_exit_2(tmp_path):
    said = refused([*TINY, "loss.sequences.temperature=-1"], tmp_path,   # exit 2, no traceback
                   "loss.sequences.temperature")
    assert said.startswith("error:") and "Configkey:`loss.sequences.temperature`" in said
