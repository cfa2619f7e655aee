"""Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016), METHODS_FAMILIES.md B5."""
from __future__ import annotations

import torch

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float
from distill_cli.tasks.lm.divergences import IGNORE_INDEX, counted, token_mean, token_nll
from distill_cli.tasks.lm.methods import check_student, check_weight
from distill_cli.teachers.sequences import check_options


class SeqKD(Objective):
    """The student trains with plain next-token CE on the TEACHER's sequences.

    For training block i (P = sequences.prompt_tokens), ŝ = the teacher's continuation of the
    block's first P tokens to its full length T + 1, generated ONCE into the output store
    (teachers/sequences.py; greedy by default); then per batch

        x = ŝ[:, :-1],  y = ŝ[:, 1:]   (y at the prompt positions j < P − 1: not counted, or with
                                         count_prompt the real block's targets there)
        loss = mean_tok −log q(y | x)  +  data_weight · mean_tok −log q(y_data | x_data)

    each mean over its counted tokens (`y != -100`), the second on the real block (x, y of the
    batch). With data_weight > 0 both go through ONE student forward of [2B, T] (one
    data-parallel forward per backward). The teacher never runs during training
    (`needs_teacher` only so the runner builds it for the store and the evaluation metrics).

    Source: the paper only (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", §3.2:
    approximate the teacher's sequence distribution by its mode ŷ = beam search, train with NLL
    on ŷ); no code read. Ours: the "source" is a prefix of the training block and the "target"
    its continuation (an LM has no source/target pair); greedy decoding, i.e. beam 1 (they use
    beam 5; beam search is not built), or sampling with a temperature; the optional data term is
    our form of their mixtures with the gold data (an added weight, not (1 − α)·NLL + α·KD on
    word level, which needs the teacher's per-token distribution: loss=fkl); a block whose prompt
    reaches the split's padding (its last block) counts none of the teacher's tokens (the
    teacher continued <pad>). Terms: `loss`, `seq_ce`, and `data_ce` when data_weight > 0.
    """

    task_name = "lm"
    needs_teacher = True
    accepts_soft_targets = False
    accepts_topk = False
    stored_samples = "sequences"   # teachers/samples.py: built once, handed over by use_samples

    def __init__(self, count_prompt: bool = False, data_weight: float = 0.0, sequences=None):
        super().__init__()
        if not isinstance(count_prompt, bool):
            raise UserError(f"count_prompt must be true or false, got {count_prompt!r}",
                            "loss.count_prompt", "Use false (only the teacher's tokens count) "
                            "or true (the prompt's real targets count too)")
        self.count_prompt = count_prompt
        self.data_weight = check_weight(data_weight, "data_weight")
        self.samples_options = check_options(**dict(sequences or {}))
        self.prompt_tokens = self.samples_options["prompt_tokens"]
        self.sequences = None

    def check_data(self, data) -> None:
        """Refused from the data alone, before the teacher is built (or trained by the store):
        a prompt that leaves the teacher nothing to generate."""
        T = int(data.input_shape[-1])
        if self.prompt_tokens >= T:
            raise UserError(f"prompt_tokens={self.prompt_tokens} leaves the teacher nothing to "
                            f"generate before the block's last input position "
                            f"(dataset.block_size={T})", "loss.sequences.prompt_tokens",
                            f"Use prompt_tokens < {T} (e.g. {max(1, T // 4)})")

    def use_samples(self, sequences) -> None:
        """The runner hands over the teacher's sequences (`get(index) -> ids [B, T + 1]`)."""
        self.sequences = sequences

    def sequence_batch(self, seq: torch.Tensor, block_y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [B, T] of the teacher's sequences `seq` [B, T + 1] of blocks whose real
        targets are `block_y` [B, T]."""
        if seq.shape[0] != block_y.shape[0] or seq.shape[1] != block_y.shape[1] + 1:
            raise ValueError(f"teacher sequences {tuple(seq.shape)} do not continue blocks of "
                             f"targets {tuple(block_y.shape)} (want [B, T + 1])")
        head = self.prompt_tokens - 1            # targets y[:, :P-1] are prompt tokens
        x, y = seq[:, :-1], seq[:, 1:].clone()
        real = block_y[:, :head]
        y[:, :head] = real if self.count_prompt else IGNORE_INDEX
        padded = (real == IGNORE_INDEX).any(1)   # the prompt reaches the split's padding
        y[:, head:] = y[:, head:].masked_fill(padded[:, None], IGNORE_INDEX)
        return x, y

    def terms(self, seq_logits: torch.Tensor, seq_targets: torch.Tensor,
              data_logits: torch.Tensor | None = None,
              data_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss of the student's logits on the teacher's sequences (and on the real block
        when data_weight > 0)."""
        out = self(seq_logits, None, seq_targets)
        if self.data_weight > 0:
            check_student(data_logits, data_targets)
            data_ce = _ce(data_logits, data_targets)
            out.update(loss=out["loss"] + self.data_weight * data_ce, data_ce=data_ce.detach())
        return out

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor, ctx: StepContext | None = None) -> dict[str, torch.Tensor]:
        """The sequence term alone: `student_logits` on the teacher's sequences, `targets` from
        `sequence_batch` (the objective contract; training goes through `train_terms`)."""
        check_student(student_logits, targets)
        seq_ce = _ce(student_logits, targets)
        return {"loss": seq_ce, "seq_ce": seq_ce.detach()}

    def train_terms(self, student, forward, teacher, batch, ctx):
        if self.sequences is None:
            raise RuntimeError("loss=seqkd trains on the teacher's stored sequences, but none "
                               "were handed to it (use_samples) before its first step")
        x, y = self.sequence_batch(self.sequences.get(batch.index), batch.y)
        if self.data_weight == 0:
            return self.terms(forward(x).float(), y)
        logits = forward(torch.cat([x, batch.x])).float()   # one forward for both terms
        b = x.shape[0]
        return self.terms(logits[:b], y, logits[b:], batch.y)

    def extra_repr(self) -> str:
        return (f"count_prompt={self.count_prompt}, data_weight={self.data_weight}, "
                f"sequences={self.samples_options}")


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over counted tokens of −log q(y); padded positions' logits zeroed first (as every LM
    objective), so what they hold never reaches the loss."""
    mask = counted(targets)
    s = torch.where(mask.unsqueeze(-1), as_float(logits), 0.0)
    return token_mean(token_nll(s, targets), mask)
