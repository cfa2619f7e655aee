"""task=agent (synthetic tool use): the safe calculator, the tool-splicing runtime on token
streams, the tool-executing decoder on a really trained tiny GPT, the success metrics, the
toolcalc data's determinism and split, the recipe end to end, and refusals with their key."""
from __future__ import annotations

import json
import math
import operator
import re

import pytest
import torch
import torch.nn.functional as F

from distill_cli.data import toolcalc
from distill_cli.data.tokenizer import ByteTokenizer
from distill_cli.errors import UserError
from distill_cli.models.gpt import gpt
from distill_cli.tasks.agent.methods.seqkd import AgentSeqKD
from distill_cli.tasks.agent.task import AgentTask, episode_metrics
from distill_cli.tasks.agent.tools import (EOD, PAD, STATS, ToolError, ToolSplicer, calc,
                                           run_episodes)
from distill_cli.tasks.lm.methods.seqkd import SeqKD
from distill_cli.teachers.sequences import teacher_sequences
from distill_cli.training.run import run

from conftest import make_cfg
from test_cli import refused

TOK = ByteTokenizer()
SMALL = {"questions": 128, "val_fraction": 0.125, "test_fraction": 0.125}   # 96/16/16
BASE = ["recipe=agent_toolcalc", "logger=none", "trainer.epochs=1", "trainer.batch_size=16",
        "teacher.train.epochs=1", "teacher.train.batch_size=16", "teacher.d_model=32",
        "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16", "student.n_heads=2",
        "student.n_layers=1", "trainer.log_every_n_steps=2", "task.samples=3"]
TINY = [*BASE, "dataset.questions=96", "dataset.val_fraction=0.1667",
        "dataset.test_fraction=0.1667"]   # 64 / 16 / 16 questions
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def reference_call(expr: str) -> str:
    """The tool output a call must get: for `a<op>b` of non-negative integers (what the scripts
    call) independently of calc — a regular expression and Python's operators; any other
    expression through calc itself (tested on its own above), or =ERR."""
    m = re.fullmatch(r"(\d+)([+*-])(\d+)", expr)
    if m:
        return f"={OPS[m.group(2)](int(m.group(1)), int(m.group(3)))}"
    try:
        return f"={calc(expr)}"
    except ToolError:
        return "=ERR"


# ------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr,value", [
    ("347*29", 10063), ("10063+12", 10075), ("(47*29)+312", 1675), ("2-9", -7),
    ("-5*-3", 15), ("17//5", 3), ("-17//5", -4), (" ( (1+2) * (3+4) ) ", 21), ("+4", 4),
    ("999999*999999", 999998000001)])
def test_calc_computes_integer_arithmetic(expr, value):
    assert calc(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "x+1", "(1).real", "abs(-3)", "[1][0]", "2**10",
    "9**9**9", "2**100000", "1/2", "7%3", "1<2", "1.5+1", "'a'*3", "True+1", "lambda: 1",
    "1 if 1 else 2", "5//0", "", "1+", "9" * 65, "1" * 30 + "*" + "1" * 30,
    "999999999*999999999", "-" * 20 + "1"])
def test_calc_refuses_anything_but_bounded_integer_arithmetic(expr):
    with pytest.raises(ToolError):
        calc(expr)


# ------------------------------------------------------------------------------- splicing
def feed(ep: ToolSplicer, text: str) -> str:
    """Feed `text` byte by byte as MODEL tokens; returns what the tool forced, concatenated."""
    forced = []
    for b in text.encode():
        forced += ep.model_token(b)
    return bytes(forced).decode()


def test_the_splicer_runs_each_call_and_reads_the_answer_line():
    ep = ToolSplicer()
    assert feed(ep, "T: <c>47*29</c>") == "=1363"
    assert feed(ep, " <c>1363+312</c>") == "=1675"
    assert not ep.done
    assert feed(ep, "\nA: 1675\n") == "" and ep.done and ep.answer == "1675"
    q = toolcalc.Question("(47*29)+312", 1675, ((47, "*", 29, 1363), (1363, "+", 312, 1675)),
                          (1363, 1675))
    assert ep.text.decode() == toolcalc.render(q, "trajectory", 11).split("\n", 1)[1]
    assert ep.calls == [("47*29", 1363), ("1363+312", 1675)]
    assert ep.stats(1675, q.steps) == [1.0, 1.0, 2.0, 2.0, 0.0]
    assert ep.stats(1676, q.steps)[0] == 0.0


def test_malformed_calls_get_an_error_marker_and_count():
    ep = ToolSplicer()
    assert feed(ep, "T: 3</c>") == "=ERR"                  # a close tag without an open one
    assert feed(ep, " <c>x+1</c>") == "=ERR"               # not arithmetic
    assert feed(ep, " <c>2**99</c>") == "=ERR"             # a power
    assert feed(ep, " <c>5+6</c>") == "=11"
    assert feed(ep, "\nA: 12\n") == "" and ep.answer == "12"
    assert ep.stats(11, (11,)) == [0.0, 1.0, 4.0, 1.0, 3.0]
    stopped = ToolSplicer()
    feed(stopped, "T: <c>1+1</c")
    assert stopped.model_token(EOD) == [] and stopped.done and stopped.answer is None
    assert stopped.stats(2, (2,)) == [0.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(RuntimeError):
        stopped.model_token(ord("x"))
    junk = ToolSplicer()
    feed(junk, "A: 1x\n")                                   # an answer that is no integer
    assert junk.done and junk.stats(1, ())[:2] == [0.0, 0.0]


# ------------------------------------------------------------------------------- the decoder
@pytest.fixture(scope="module")
def trained():
    """(data, a GPT d32 x 2 trained for 250 steps on 96 scripted trajectories): enough that it
    writes tool calls (not that they are right)."""
    data = toolcalc.build(**SMALL)
    torch.manual_seed(0)
    model = gpt(TOK.vocab_size, 1, (data.input_shape[-1],), d_model=32, n_layers=2, n_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(250):
        for batch in data.train.train_batches(32, 0, step):
            loss = F.cross_entropy(model(batch.x).flatten(0, 1), batch.y.flatten(),
                                   ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            break
    return data, model.eval()


def test_the_decoder_executes_the_tool_and_otherwise_follows_the_model(trained):
    """Replaying each row: after every `</c>` the stream holds the tool's result (checked
    against an independent reference), after the answer line `<eod>` then `<pad>`, and every
    other token is the greedy choice of a full (uncached) forward on the prefix."""
    data, model = trained
    split = data.test
    P, T = split.prompt_tokens, data.input_shape[-1]
    ids, episodes = run_episodes(model, split.x[:, :P], T + 1)
    assert ids.shape == (len(split), T + 1) and torch.equal(ids[:, :P], split.x[:, :P])
    with torch.no_grad():
        greedy = model(ids[:, :T]).argmax(-1)          # greedy[i, j]: the pick for j + 1
    calls = 0
    for i, row in enumerate(ids.tolist()):
        pos, ended = P, False
        while pos <= T:
            if ended:
                assert row[pos] == PAD, (i, pos)
                pos += 1
                continue
            tok = row[pos]
            assert tok == int(greedy[i, pos - 1]), (i, pos)
            text = bytes(t for t in row[P:pos + 1] if t < 256).decode()
            pos += 1
            if text.endswith("</c>"):
                expr = text[:-4].rsplit("<c>", 1)[-1] if "<c>" in text[:-4] else ""
                want = reference_call(expr).encode()[:T + 1 - pos]   # the context may end
                assert bytes(row[pos:pos + len(want)]) == want, (i, text)
                pos, calls = pos + len(want), calls + 1
            elif tok == EOD or (tok == ord("\n") and text[:-1].rsplit("\n", 1)[-1]
                                .startswith("A: ")):
                if tok != EOD and pos <= T:
                    assert row[pos] == EOD
                    pos += 1
                ended = True
        ep = episodes[i]
        assert len(ep.calls) == bytes(t for t in row[P:] if t < 256).count(b"</c>")
    assert calls > 0   # the trained model does call the tool


def test_stored_teacher_trajectories_are_the_tool_using_decoder_once(trained, tmp_path):
    """loss.sequences.tools=calc: the stored rows are run_episodes' rows (tool results in
    them), keyed apart from plain decoding, computed once."""
    data, model = trained
    T = data.input_shape[-1]
    first = teacher_sequences(model, data, store_root=str(tmp_path), prompt_tokens=19,
                              batch_size=40, tools="calc")
    again = teacher_sequences(model, data, store_root=str(tmp_path), prompt_tokens=19,
                              tools="calc")
    assert first.built and not again.built and first.key == again.key
    stored = again.get(torch.arange(len(data.train)))
    want = torch.cat([run_episodes(model, data.train.x[s:s + 40, :19], T + 1)[0]
                      for s in range(0, len(data.train), 40)])
    assert torch.equal(stored, want)
    text = TOK.decode([t for t in stored.flatten().tolist() if t < 256])
    assert re.search(r"</c>=(-?\d+|ERR)", text)
    plain = teacher_sequences(model, data, store_root=str(tmp_path), prompt_tokens=19)
    assert plain.key != first.key and not torch.equal(plain.get(torch.arange(4)), stored[:4])


def test_agent_seqkd_counts_the_teachers_tokens_up_to_its_eod():
    """Against the definition: targets = the stored row shifted by one, none at the prompt's
    positions (the question's -100 targets are not padding), none after the first <eod>."""
    P = 4
    obj = AgentSeqKD(sequences={"prompt_tokens": P, "tools": "calc"})
    seq = torch.tensor([[1, 2, 3, 4, 5, 6, EOD, PAD, PAD, PAD],
                        [1, 2, 3, 4, 5, 6, 7, 8, 9, EOD]])
    block_y = torch.full((2, 9), -100)
    block_y[:, P - 1:] = 42
    x, y = obj.sequence_batch(seq, block_y)
    assert torch.equal(x, seq[:, :-1])
    assert y.tolist() == [[-100, -100, -100, 5, 6, EOD, -100, -100, -100],
                          [-100, -100, -100, 5, 6, 7, 8, 9, EOD]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 300, generator=g, dtype=torch.float64)
    want = sum(-torch.log_softmax(logits[b, j], -1)[int(y[b, j])] for b in range(2)
               for j in range(9) if int(y[b, j]) != -100) / int((y != -100).sum())
    assert float(obj.terms(logits, y)["loss"]) == pytest.approx(float(want), rel=1e-12)
    plain_x, plain_y = SeqKD(sequences={"prompt_tokens": P}).sequence_batch(seq, block_y)
    assert bool((plain_y == -100).all())   # why the agent form: SeqKD drops these blocks


def test_predict_scores_the_episodes_of_val_and_test_only(trained):
    data, model = trained
    task = AgentTask()
    out, y = task.predict(model, data.test, 8, torch.device("cpu"), "32")
    T = data.input_shape[-1]
    assert out.shape == (len(data.test), T + 1, TOK.vocab_size)
    _, eps = task.episodes(model, data.test, 5)
    stats = torch.tensor([ep.stats(q.answer, q.steps) for ep, q in zip(eps, data.test.questions)],
                         dtype=torch.float64)
    s = task.score(out, y, out)            # a T + 1 reference is cut to T
    assert s["success"] == pytest.approx(stats[:, 0].mean().item() * 100)
    assert s["calls"] == pytest.approx(stats[:, 2].mean().item())
    assert s["agreement"] == 100 and s["token_kl"] == pytest.approx(0, abs=1e-9)
    plain = AgentTask().score(out[:, :T], y)
    assert plain["nll"] == s["nll"] and "success" not in plain
    assert task.predict(model, data.train, 8, torch.device("cpu"), "32")[0].shape[1] == T
    assert AgentTask(val_success=False).predict(model, data.val, 8, torch.device("cpu"),
                                                "32")[0].shape[1] == T


def test_the_success_metrics_of_known_episodes():
    rows = torch.tensor([[1, 1, 2, 2, 0], [0, 1, 3, 1, 1], [0, 0, 0, 0, 0], [1, 1, 2, 1, 0]],
                        dtype=torch.float64)
    m = episode_metrics(rows)
    assert m["success"] == 50 and m["answered"] == 75 and m["tool_use"] == 75
    assert m["calls"] == 7 / 4 and m["call_acc"] == pytest.approx(4 / 7 * 100)
    assert m["call_errors"] == pytest.approx(100 / 7) and m["questions"] == 4
    none = episode_metrics(torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float64))
    assert none["success"] == 50 and none["tool_use"] == 0 and "call_acc" not in none
    # through score: the appended position; rows past eval_questions (NaN) are not counted
    T, V = 3, 5
    out = torch.zeros(5, T + 1, V)
    out[:4, T, :len(STATS)] = rows.float()
    out[4, T, 0] = float("nan")
    y = torch.zeros(5, T, dtype=torch.int64)
    s = AgentTask(select="success").score(out, y)
    assert s["success"] == 50 and s["questions"] == 4
    assert s["select_success"] == pytest.approx(50 - s["nll"] / 1000)


# ------------------------------------------------------------------------------- the data
def test_the_data_is_a_pure_function_of_its_seeds_and_splits_by_question():
    a, b = toolcalc.build(**SMALL), toolcalc.build(**SMALL)
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
        assert sa.questions == sb.questions
    assert (len(a.train), len(a.val), len(a.test)) == (96, 16, 16)
    sets = [{q.expr for q in s.questions} for s in (a.train, a.val, a.test)]
    assert len(set.union(*sets)) == 128                       # disjoint, distinct questions
    other = toolcalc.build(**SMALL, seed=1)
    assert {q.expr for q in other.train.questions} != sets[0]
    resplit = toolcalc.build(**SMALL, split_seed=1)
    assert {q.expr for q in resplit.test.questions} != sets[2]
    assert set.union(*[{q.expr for q in s.questions}
                       for s in (resplit.train, resplit.val, resplit.test)]) == set.union(*sets)
    for q in a.train.questions:                                # the script is right
        assert calc(q.expr) == q.answer == q.steps[-1] and 2 <= len(q.calls) <= 3
        assert all(calc(f"{l}{op}{r}") == v for l, op, r, v in q.calls)
    assert a.teacher_data is None
    limited = toolcalc.build(**SMALL, limit_train=10, limit_eval=4)   # the first N, same split
    assert limited.train.questions == a.train.questions[:10]
    assert limited.test.questions == a.test.questions[:4]


def test_blocks_count_the_response_and_the_answer_rendering_shares_the_questions():
    data = toolcalc.build(**SMALL)
    ans = toolcalc.build(**SMALL, rendering="answer")
    assert ans.test.questions == data.test.questions
    assert ans.teacher_data.identity == data.identity          # its teacher learns trajectories
    P = data.test.prompt_tokens
    assert P == 19 and data.identity["prompt_tokens"] == 19
    for split in (data.test, ans.test):
        for i, q in enumerate(split.questions):
            x, y = split.x[i].tolist(), split.y[i].tolist()
            text = toolcalc.render(q, data.identity["rendering"] if split is data.test
                                   else "answer", 15)
            n = len(text)
            assert TOK.decode(x[:n]) == text and x[n] == EOD and set(x[n + 1:]) <= {PAD}
            assert x[P - 1] == ord("\n") and set(y[:P - 1]) == {-100}   # not the question
            assert y[P - 1:n] == x[P:n + 1] and set(y[n:]) == {-100}   # the rest, <eod> too
    assert "<c>" in TOK.decode(data.test.x[0].tolist())
    assert "<c>" not in TOK.decode(ans.test.x[0].tolist())


# ------------------------------------------------------------------------------- runs
def test_the_recipe_end_to_end(tmp_path, monkeypatch):
    """The store trains the teacher on trajectories; seqkd reads the teacher's trajectories,
    generated once with the calculator (every stored call result is right); all three students
    report success; the answers-only and CE students run without the teacher."""
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    # the recipe turns the per-epoch val success off (time); the task still reports it on request
    summary = run(make_cfg([*TINY, "task.val_success=true"]), tmp_path / "seqkd", tty=False)
    assert summary["status"] == "finished" and summary["task"] == "agent"
    assert summary["loss"] == "AgentSeqKD"      # recipe_loss: seqkd's agent form
    for key in ("best/test/success", "last/test/success", "best/test/tool_use",
                "best/test/ppl", "teacher/test/success", "teacher/test/ppl"):
        assert math.isfinite(summary[key]), key
    assert summary["best/test/questions"] == 16
    text = (tmp_path / "seqkd" / "trajectories_best.txt").read_text()
    assert text.count("--- question") == 3 and "Q: " in text
    tables = list((tmp_path / "home").glob("outputs/*/sequences.npy"))
    assert len(tables) == 1
    import numpy as np
    rows = np.load(tables[0]).astype(np.int64)
    data = toolcalc.build(questions=96, val_fraction=0.1667, test_fraction=0.1667)
    assert rows.shape == (64, 97) and (rows[:, :19] == data.train.x[:, :19].numpy()).all()
    checked = 0
    for row in rows.tolist():
        text = bytes(t for t in row if t < 256).decode()
        for expr, result in re.findall(r"<c>([^<]*)</c>(=-?\d+|=ERR)", text):
            try:
                want = f"={calc(expr)}"
            except ToolError:
                want = "=ERR"
            assert result == want
            checked += 1
    train_rows = [json.loads(r) for r in (tmp_path / "seqkd" / "metrics.jsonl").read_text()
                  .splitlines()]
    assert train_rows[-1]["train/seq_ce"] > 0      # the teacher's tokens count
    rows_metrics = (tmp_path / "seqkd" / "metrics.jsonl").read_text()
    assert '"val/success"' in rows_metrics
    for name, extra in (("answers", ["dataset.rendering=answer"]), ("ce", [])):
        s = run(make_cfg([*TINY, "loss=lm_ce", *extra]), tmp_path / name, tty=False)
        assert s["status"] == "finished" and math.isfinite(s["best/test/success"])
    assert '"val/success"' not in (tmp_path / "answers" / "metrics.jsonl").read_text()
    # distill-report ranks agents by their tool-using success, with the agent columns
    from distill_cli.reporting.report import report
    # (run() records no command-line overrides: the two lm_ce runs group as one config here)
    rows = report([tmp_path / d for d in ("seqkd", "answers", "ce")], fmt="md")
    assert len(rows) >= 2 and all("best/test/success" in r for r in rows)
    values = [r["best/test/success"] for r in rows]
    values = [v[0] if isinstance(v, tuple) else v for v in values]
    assert values == sorted(values, reverse=True)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,key", [
    (["dataset.rendering=steps"], "dataset.rendering"),
    (["dataset.block_size=40"], "dataset.block_size"),
    (["dataset.question_width=9"], "dataset.question_width"),
    (["dataset.operations=[2,7]"], "dataset.operations"),
    (["dataset.val_fraction=1.5"], "dataset.val_fraction"),
    (["dataset.test_fraction=0.9"], "dataset.test_fraction"),    # no training question left
    (["dataset.questions=2"], "dataset.questions"),
    (["dataset.max_leaf=3", "dataset.questions=5000"], "dataset.questions"),
    (["dataset.limit_train=0"], "dataset.limit_train"),
    (["task.select=accuracy"], "task.select"),
    (["task.select=success", "task.val_success=false"], "task.select"),
    (["loss.sequences.tools=browser"], "loss.sequences.tools"),
    (["loss.sequences.prompt_tokens=16"], "loss.sequences.prompt_tokens"),
    (["dataset=text", "dataset.block_size=32", "dataset.limit_train=32", "loss=lm_ce"],
     "dataset"),
])
def test_bad_input_is_refused_naming_the_key(tmp_path, overrides, key, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    base = BASE if "dataset=text" in overrides else TINY
    with pytest.raises(UserError) as info:
        run(make_cfg([*base, *overrides]), tmp_path / "r", tty=False)
    assert info.value.key == key and info.value.fix
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_tools_on_plain_text_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as info:
        run(make_cfg(["recipe=lm_stdlib_tiny", "logger=none", "dataset.block_size=32",
                      "dataset.limit_train=32", "dataset.limit_eval=8", "trainer.epochs=1",
                      "trainer.batch_size=16", "teacher.train.epochs=1", "teacher.d_model=16",
                      "teacher.n_layers=1", "teacher.n_heads=2", "student.d_model=16",
                      "student.n_heads=2", "student.n_layers=1", "loss=seqkd",
                      "loss.sequences.prompt_tokens=8", "+loss.sequences.tools=calc"]),
            tmp_path / "r", tty=False)
    assert info.value.key == "loss.sequences.tools"


def test_the_cli_refuses_an_unknown_rendering_with_exit_2(tmp_path):
    said = refused([*TINY, "dataset.rendering=steps"], tmp_path,   # exit 2, no traceback
                   "dataset.rendering")
    assert said.startswith("error:") and "Configkey:`dataset.rendering`" in said
