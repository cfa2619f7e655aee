"""`loss=seqkd` under task=agent: sequence-level KD on the teacher's tool-using trajectories."""
from __future__ import annotations

import torch

from distill_cli.tasks.agent.tools import EOD
from distill_cli.tasks.lm.divergences import IGNORE_INDEX
from distill_cli.tasks.lm.methods.seqkd import SeqKD


class AgentSeqKD(SeqKD):
    """SeqKD (Kim & Rush 2016; tasks/lm/methods/seqkd.py) on the teacher's trajectories, stored
    once with the calculator in the loop (`loss.sequences.tools=calc`, teachers/sequences.py):
    the same loss, mean_tok −log q(ŝ[1:] | ŝ[:-1]) over the teacher's tokens, tool outputs
    included, with two differences dataset=toolcalc needs (recipe_loss/agent_toolcalc_seqkd.yaml
    makes `loss=seqkd` build this class under recipe=agent_toolcalc):

    * the prompt is the question line, whose targets the data leaves at -100 (a model is not
      asked to predict random operands). SeqKD reads a -100 inside its prompt as "the prompt
      reaches the split's padding" and would count none of the block; a question line is never
      padding, so here only the prompt's own positions go uncounted;
    * targets after a row's first `<eod>` (the decoder's `<pad>` fill once the answer line
      ended) do not count, as the data's blocks count nothing after their `<eod>`.
    """

    task_name = "agent"

    def sequence_batch(self, seq: torch.Tensor, block_y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        if seq.shape[0] != block_y.shape[0] or seq.shape[1] != block_y.shape[1] + 1:
            raise ValueError(f"teacher sequences {tuple(seq.shape)} do not continue blocks of "
                             f"targets {tuple(block_y.shape)} (want [B, T + 1])")
        head = self.prompt_tokens - 1
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :head] = block_y[:, :head] if self.count_prompt else IGNORE_INDEX
        eod = (y == EOD).int()
        after = (eod.cumsum(1) - eod) > 0          # strictly after the first <eod> target
        return x, y.masked_fill(after, IGNORE_INDEX)
