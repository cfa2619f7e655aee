"""`task=lm`: distillation of causal language models.

batch           `Batch(index, x, y)`: x = [B, T] token ids, y = [B, T] next tokens, -100 where a
                position does not count (data/text.py); a pure function of (data_seed, epoch, step)
model contract  `model(ids [B, T]) -> logits [B, T, V]` (models/gpt.py), V = the tokenizer's size
teacher store   the teacher is a student run of this task with `teacher.train.loss` (lm_ce)
evaluation      over the counted tokens of a split: NLL, perplexity, next-token accuracy, and
                against the teacher's logits top-1 agreement and the mean token KL(teacher ‖
                student); `best` by val -NLL; samples from fixed test prompts (samples_<tag>.txt)
stored output   for an objective that reads packed top-k (`accepts_topk`, loss=topk): per block
                the [T, 2k] rows of `divergences.pack_topk` (top-k log-probabilities, then
                their indices), stored in teacher.outputs_dtype and served alike live; float16
                holds the indices exactly only for V <= 2048 (refused above: float32). Any other
                objective: the teacher's full [T, V] logits. Evaluation references (agreement,
                token KL) stay dense: with top-k rows they are computed live, once a run.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_cli.config.build import build_model
from distill_cli.errors import UserError
from distill_cli.tasks.base import StoredSignal, Task
from distill_cli.tasks.classification.evaluate import predict
from distill_cli.tasks.lm.columns import REPORT_COLUMNS

IGNORE = -100
# the largest vocabulary whose indices (0 .. V-1) a stored dtype holds exactly: float16 has an
# 11-bit significand (every integer up to 2048), float32 a 24-bit one
EXACT_VOCAB = {"float16": 2048, "float32": 2 ** 24 - 1}   # (pack_topk: V < 2^24)


class LMTask(Task):
    name = "lm"
    selection_metric = "neg_nll"
    report_columns = REPORT_COLUMNS

    def __init__(self, prompts: int = 4, prompt_tokens: int = 16, sample_tokens: int = 48,
                 temperature: float = 0.8, **_):
        self.prompts, self.prompt_tokens = int(prompts), int(prompt_tokens)
        self.sample_tokens, self.temperature = int(sample_tokens), float(temperature)

    def build_model(self, node, key, data):
        if not data.name.startswith("text"):
            raise UserError(f"task=lm trains language models on token blocks, but "
                            f"dataset={data.name} holds {tuple(data.input_shape)} samples",
                            "dataset", "Use dataset=text (a corpus and a tokenizer)")
        model = build_model(node, key, data)   # input_shape (1, T): one channel of T ids
        if not hasattr(model, "generate"):
            raise UserError(f"{key}={node.get('arch')} is not a language model (ids -> [B, T, V])",
                            key, f"Use {key}=gpt_tiny or gpt_small (or {key}.arch=gpt)")
        return model

    def train_batches(self, data, batch_size, data_seed, epoch, start_step, mix):
        return data.train.train_batches(batch_size, data_seed, epoch, start_step)

    def predict(self, model, split, batch_size, device, precision):
        return predict(model, split, batch_size, device, precision)   # [N, T, V] logits

    def score(self, outputs, targets, reference=None):
        mask = targets != IGNORE
        n = int(mask.sum())
        if n == 0:
            raise UserError("The evaluation split has no counted token", "dataset.limit_eval",
                            "Raise dataset.limit_eval or dataset.val_fraction")
        logp = F.log_softmax(outputs.double(), -1)
        safe = targets.clamp_min(0)
        nll = -(logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask).sum() / n
        acc = ((outputs.argmax(-1) == targets) & mask).sum().double() / n * 100
        out = {"nll": float(nll), "neg_nll": -float(nll), "ppl": math.exp(min(float(nll), 700)),
               "acc1": float(acc), "n": n}
        if reference is not None:
            ref = F.log_softmax(reference.double(), -1)
            kl = ((ref.exp() * (ref - logp)).sum(-1) * mask).sum() / n
            agree = ((outputs.argmax(-1) == reference.argmax(-1)) & mask).sum().double() / n
            out.update(agreement=float(agree) * 100, token_kl=float(kl))
        return out

    def stored_row_shape(self, data):
        return (int(data.input_shape[-1]), int(data.num_classes))

    def stored_signal(self, objective, data, dtype):
        """Packed top-k rows `[T, 2k]` for an objective that reads them (`accepts_topk`: a
        table V/2k times smaller than `[T, V]` logits in the same dtype: 196x at V = 50,257,
        k = 128), else the dense logits. Checked here, before any teacher runs, because the
        live path packs and rounds alike: a k the vocabulary cannot serve, or indices the
        dtype cannot hold."""
        if not getattr(objective, "accepts_topk", False):
            return super().stored_signal(objective, data, dtype)
        T, V, k = int(data.input_shape[-1]), int(data.num_classes), int(objective.k)
        if k > V:
            raise UserError(f"top-k k = {k} exceeds the vocabulary size {V}", "loss.k",
                            f"Use k <= {V}")
        if 2 * k == V:   # the objectives tell dense [.., V] from packed [.., 2k] by the width
            raise UserError(f"k = {k} = V/2 packs the top-k rows to the width of dense logits "
                            f"({V})", "loss.k", f"Use k = {k + 1} (or any k != {k})")
        limit = EXACT_VOCAB.get(dtype)
        if limit is not None and V > limit:
            raise UserError(f"teacher.outputs_dtype={dtype} cannot hold the vocabulary indices "
                            f"of the packed top-k rows exactly (V = {V} > {limit})",
                            "teacher.outputs_dtype",
                            "Use teacher.outputs_dtype=float32 (exact indices below 2^24)")
        from distill_cli.tasks.lm.divergences import pack_topk

        return StoredSignal((T, 2 * k), lambda logits: pack_topk(logits, k),
                            {"form": "topk_logprobs", "k": k})

    def artifacts(self, model, run_dir, tag, data, logger, source):
        """Samples from fixed prompts (the first tokens of the first test blocks), greedy and
        sampled (seeded), decoded with the run's tokenizer: samples_<tag>.txt."""
        if tag == "start":
            return
        from distill_cli.data import tokenizer as tokenizers

        tok = tokenizers.load(data.identity["tokenizer"], source.get("store_root"))
        x = data.test.x[: self.prompts, : self.prompt_tokens]
        room = int(data.input_shape[-1]) - x.shape[1]
        n = max(0, min(self.sample_tokens, room))
        g = torch.Generator(device=x.device).manual_seed(0)
        greedy = model.generate(x, n, temperature=0.0)
        sampled = model.generate(x, n, temperature=self.temperature, generator=g)
        lines = []
        for i in range(x.shape[0]):
            lines += [f"--- prompt {i}: {tok.decode(x[i].tolist())!r}",
                      f"greedy : {tok.decode(greedy[i, x.shape[1]:].tolist())!r}",
                      f"sampled: {tok.decode(sampled[i, x.shape[1]:].tolist())!r}"]
        path = Path(run_dir) / f"samples_{tag}.txt"
        from distill_cli.io import atomic_write_bytes
        atomic_write_bytes(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
