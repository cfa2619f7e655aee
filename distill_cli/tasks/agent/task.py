"""`task=agent`: agent-trajectory distillation on synthetic tool use (dataset=toolcalc).

An LM task (LMTask) whose blocks are one question each (data/toolcalc.py), so everything of
task=lm holds — batches, the GPT model contract, the LM objectives (lm_ce, fkl, ..., seqkd),
NLL / perplexity / token accuracy / agreement / token KL over the counted tokens — plus the
measure the agent-distillation papers report, executed with the real tool:

success     % of questions whose answer line `A: <int>` equals the true answer, the model
            decoding greedily from the question line `Q: ...\\n` with the calculator in the loop
            (tools.py `run_episodes`: KV cache, tool outputs forced into the stream)
answered    % of questions with an integer answer line before the context ran out
tool_use    % of questions with at least one tool call; `calls`: calls per question
call_acc    % of calls whose result is one of the question's true intermediate values;
call_errors % of calls the calculator refused (malformed): both absent when nothing was called

Computed on every test evaluation (the student's best and last weights and the teacher) and, with
`val_success` (default), on validation every epoch: measured 0.6-1.0 s per 200 questions for a
gpt_tiny-sized model on one (shared) CPU core, logits included — under 10% of an epoch of the
recipe (125 steps at ~0.09 s), so it is on. `best` stays selected by val -NLL unless
`select=success` (val success, ties broken by -NLL: success − nll / 1000, which never reorders
two different success rates of up to 100,000 questions) — the agent papers pick checkpoints by
held-out success; NLL is the default because success is coarse (0.5% steps on 200 questions)
and flat at 0 early on, where NLL still ranks the epochs.

How the per-question results reach `score`: `predict` returns the split's logits [N, T, V] with
ONE extra position appended, [N, T + 1, V], whose first len(tools.STATS) entries hold the
question's [success, answered, calls, correct calls, malformed calls] — stateless, so the
teacher's references (computed once and cached by its topology) carry their own. `score` reads
it when outputs have T + 1 positions (a stored evaluation table, teacher.outputs=store, has
plain [T, V] rows: then no teacher success). Trajectories of the first `samples` test questions:
`trajectories_<tag>.txt` in the run dir.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distill_cli.errors import UserError
from distill_cli.tasks.agent.columns import REPORT_COLUMNS
from distill_cli.tasks.agent.tools import STATS, run_episodes
from distill_cli.tasks.lm.task import LMTask

SELECT = {"neg_nll": "neg_nll", "success": "select_success"}


class AgentTask(LMTask):
    name = "agent"
    report_columns = REPORT_COLUMNS

    def __init__(self, val_success: bool = True, select: str = "neg_nll",
                 eval_questions: int | None = None, samples: int = 8, **lm):
        super().__init__(**lm)
        if not isinstance(val_success, bool):
            raise UserError(f"val_success must be true or false, got {val_success!r}",
                            "task.val_success", "Use true (success on val every epoch) or false")
        if select not in SELECT:
            raise UserError(f"select={select!r} is not a selection rule", "task.select",
                            f"Use one of {', '.join(SELECT)}")
        if select == "success" and not val_success:
            raise UserError("select=success needs the validation success rate", "task.select",
                            "Set task.val_success=true, or task.select=neg_nll")
        if eval_questions is not None and (isinstance(eval_questions, bool) or not isinstance(
                eval_questions, int) or eval_questions < 1):
            raise UserError(f"eval_questions must be a positive integer or null, got "
                            f"{eval_questions!r}", "task.eval_questions",
                            "Use null (every question of the split) or e.g. 200")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise UserError(f"samples must be an integer >= 0, got {samples!r}", "task.samples",
                            "Use e.g. 8 (0: no trajectories file)")
        self.val_success, self.eval_questions, self.samples = val_success, eval_questions, samples
        self.selection_metric = SELECT[select]

    def check_objective(self, objective):
        if objective.task_name not in ("lm", self.name):   # the LM family's objectives
            super().check_objective(objective)

    def build_model(self, node, key, data):
        if data.name != "toolcalc":
            raise UserError(f"task=agent runs tool-use episodes on dataset=toolcalc questions, "
                            f"but dataset={data.name}", "dataset",
                            "Use dataset=toolcalc (recipe=agent_toolcalc), or task=lm for text")
        from distill_cli.config.build import build_model
        model = build_model(node, key, data)
        if not hasattr(model, "new_cache"):
            raise UserError(f"{key}={node.get('arch')} is not a language model with cached "
                            "decoding (ids -> [B, T, V])", key,
                            f"Use {key}=gpt_tiny or gpt_small (or {key}.arch=gpt)")
        return model

    # ---------------------------------------------------------------- evaluation
    def _episodes_wanted(self, split) -> bool:
        name = getattr(split, "name", None)
        return name == "test" or (name == "val" and self.val_success)

    def episodes(self, model, split, batch_size: int, n: int | None = None):
        """(ids [n, L], [ToolSplicer]) of greedy tool-using episodes on the first n questions."""
        n = len(split) if n is None else min(n, len(split))
        p = split.prompt_tokens
        length = min(int(model.block_size), int(split.x.shape[1])) + 1
        device = next(model.parameters()).device
        ids, eps = [], []
        for start in range(0, n, batch_size):
            prompts = split.x[start:min(start + batch_size, n), :p].to(device)
            out, ep = run_episodes(model, prompts, length)
            ids.append(out.cpu())
            eps += ep
        return (torch.cat(ids) if ids else torch.zeros(0, length, dtype=torch.int64)), eps

    def predict(self, model, split, batch_size, device, precision):
        logits, targets = super().predict(model, split, batch_size, device, precision)
        if not self._episodes_wanted(split):
            return logits, targets
        n = len(split) if self.eval_questions is None else min(self.eval_questions, len(split))
        _, eps = self.episodes(model, split, batch_size, n)
        extra = logits.new_zeros((logits.shape[0], 1, logits.shape[2]))
        extra[:, 0, 0] = float("nan")   # questions past eval_questions: not run
        for i, (ep, q) in enumerate(zip(eps, split.questions)):
            extra[i, 0, :len(STATS)] = torch.tensor(ep.stats(q.answer, q.steps))
        return torch.cat([logits, extra], dim=1), targets

    def score(self, outputs, targets, reference=None):
        t = targets.shape[1]
        if reference is not None and reference.shape[1] == t + 1:
            reference = reference[:, :t]
        if outputs.shape[1] != t + 1:
            return super().score(outputs, targets, reference)
        out = super().score(outputs[:, :t], targets, reference)
        stats = outputs[:, t, :len(STATS)].double()
        stats = stats[~stats[:, 0].isnan()]
        out.update(episode_metrics(stats))
        if self.selection_metric == SELECT["success"]:
            out[SELECT["success"]] = out["success"] - out["nll"] / 1000
        return out

    # ---------------------------------------------------------------- artifacts
    def artifacts(self, model, run_dir, tag, data, logger, source):
        """trajectories_<tag>.txt: the first `samples` test questions' episodes, decoded."""
        if tag == "start" or self.samples == 0:
            return
        from distill_cli.data.tokenizer import ByteTokenizer
        from distill_cli.io import atomic_write_bytes

        split = data.test
        ids, eps = self.episodes(model, split, max(self.samples, 1), self.samples)
        tok, lines = ByteTokenizer(), []
        for i, (row, ep) in enumerate(zip(ids.tolist(), eps)):
            q = split.questions[i]
            ok, _, calls, correct, bad = ep.stats(q.answer, q.steps)
            head = (f"--- question {i}: {q.expr} = {q.answer} | "
                    f"{'SUCCESS' if ok else 'FAIL'} (answer {ep.answer!r}, {int(calls)} calls, "
                    f"{int(correct)} correct, {int(bad)} malformed)")
            lines += [head, tok.decode([x for x in row if x < 256]).rstrip("\n")]
        atomic_write_bytes(Path(run_dir) / f"trajectories_{tag}.txt",
                           lambda fh: fh.write(("\n".join(lines) + "\n").encode()))


def episode_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Success etc. (percentages; calls per question) of per-question rows [n, len(STATS)]."""
    n = int(stats.shape[0])
    if n == 0:
        return {}
    col = {name: stats[:, i] for i, name in enumerate(STATS)}
    calls = float(col["calls"].sum())
    out = {"success": float(col["success"].mean()) * 100,
           "answered": float(col["answered"].mean()) * 100,
           "tool_use": float((col["calls"] > 0).double().mean()) * 100,
           "calls": calls / n, "questions": n}
    if calls > 0:   # no call, no rate (a NaN would read as divergence)
        out["call_acc"] = float(col["correct_calls"].sum()) / calls * 100
        out["call_errors"] = float(col["malformed_calls"].sum()) / calls * 100
    return out
