"""On-policy GKD (Agarwal et al., ICLR 2024): a fraction λ of the optimizer steps trains on the
student's OWN samples, scored by the teacher (METHODS_FAMILIES.md B2, "On-policy mixing")."""
from __future__ import annotations

import math
import random

import torch

from distill_cli.draws import NoiseSeeded
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext, StepObjective
from distill_cli.seeding import derive_seed
from distill_cli.tasks.lm.divergences import IGNORE_INDEX, counted
from distill_cli.tasks.lm.methods.gkd import GKD
from distill_cli.teachers.topology import frozen_logits

COIN_TAG, SAMPLE_TAG = "lm-onpolicy-coin", "lm-onpolicy-sample"


# NoiseSeeded (distill_cli/draws.py): the run's noise key, a checkpointed buffer drawn in bind
class OnPolicyGKD(NoiseSeeded, StepObjective):
    """GKD with on-policy steps, as TRL's `GKDTrainer.training_step`: per optimizer step ONE
    coin; with probability λ (`lmbda`) the step is on-policy:

        prompt  s[:, :P] = the block's first P tokens (P = prompt_tokens)
        sample  s[:, P:] ~ the student itself (no grad, eval mode, KV cache), T + 1 − P tokens
                at `sampling_temperature` (optional top_k): s is a full block of T + 1 tokens
        score   x = s[:, :-1], y = s[:, 1:] with y[:, :P−1] = −100 (the prompt's targets do not
                count, as TRL slices the prompt off); the teacher (no grad) and the student
                (with grad) run on x
        loss    mean over the GENERATED tokens of JSD_β(p_teacher ‖ q_student) (divergences.
                generalized_jsd: mixture in probability space, β = 0/1 unscaled KLs)

    otherwise (off-policy) the step is exactly `loss=gkd` on the data block (every counted token
    of it: a language-modelling block has no prompt/completion split; TRL's datasets do and it
    never counts their prompts). A block whose prompt reaches the split's padding (its last)
    counts none of its generated tokens (as loss=seqkd).

    Randomness, a pure function of (noise_seed, step[, sample index]) — so every torchrun rank
    flips the same coin and draws for its samples what one process draws, and a resumed run
    continues the same sequence (noise_seed is a checkpointed buffer, drawn in `bind` from the
    RNG the runner seeds with `seed`):
        coin      random.Random(derive_seed(COIN_TAG, noise_seed, step)).random() < λ
                  (TRL: `random.random() <= lmbda`; `<` keeps λ = 0 never and λ = 1 always)
        sampling  block i draws from a CPU generator seeded derive_seed(SAMPLE_TAG, noise_seed,
                  step, i), through `GPT.generate`'s per-row generators (inverse-CDF sampling:
                  a row's tokens do not depend on the rows batched with it)

    Source: huggingface/trl@054a0dab `trl/experimental/gkd/gkd_trainer.py` (`training_step`:
    the coin, generation with the unwrapped student; `generate_on_policy_outputs`; `compute_loss`
    slicing logits [P−1 : −1] against labels [P:]; `generalized_jsd_loss`), `gkd_config.py`
    (lmbda 0.5, beta 0.5, temperature 0.9 = the SAMPLING temperature, top_k 0 = off, loss
    temperature 1.0). Ours: generation fills the block (TRL: `max_new_tokens` 128, stopping at
    EOS — a byte/BPE block has no EOS); λ's coin is seeded as above, not Python's global RNG.
    Terms: loss, on_policy (1.0/0.0), gen_tokens (generated tokens counted this step).
    Cost (recipe=lm_stdlib_tiny, 1 CPU thread): an on-policy step ~1.5x an off-policy one
    (generation ~1/3 of it, the teacher's forward another third); without the KV cache the
    generation alone would be ~7x slower.
    """

    task_name = "lm"
    needs_teacher = True
    accepts_soft_targets = False
    accepts_topk = False

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, lmbda: float = 0.5,
                 sampling_temperature: float = 0.9, top_k: int | None = None,
                 prompt_tokens: int = 16):
        super().__init__()
        self.gkd = GKD(beta=beta, temperature=temperature, lmbda=lmbda)   # checks beta, T, λ
        self.lmbda = self.gkd.lmbda
        self.sampling_temperature = _sampling_temperature(sampling_temperature)
        self.top_k = None if top_k is None else _positive_int(top_k, "top_k",
                                                              "Use null (off, TRL) or e.g. 50")
        self.prompt_tokens = _positive_int(prompt_tokens, "prompt_tokens",
                                           "Give the block tokens the student continues, e.g. 16")
        self.init_noise_seed()

    # ------------------------------------------------------------------------ setup
    def bind(self, student, teacher, data) -> None:
        """Checks against the data and the models (UserError before any step), then the noise
        key from the run's seeded RNG."""
        model = getattr(student, "module", student)
        T, V = int(data.input_shape[-1]), int(data.num_classes)
        if not hasattr(model, "generate"):
            raise UserError(f"loss=gkd_onpolicy samples from the student, but "
                            f"{type(model).__name__} cannot generate", "student",
                            "Use a language-model student (student=gpt_tiny or gpt_small)")
        if self.prompt_tokens >= T:
            raise UserError(f"prompt_tokens={self.prompt_tokens} leaves the student nothing to "
                            f"generate in a block of dataset.block_size={T} tokens",
                            "loss.prompt_tokens",
                            f"Use prompt_tokens < {T} (e.g. {max(1, T // 4)})")
        t_vocab = _vocab(getattr(teacher, "module", teacher))
        if t_vocab is not None and t_vocab != V:
            raise UserError(f"the teacher's vocabulary has {t_vocab} tokens but the data's and "
                            f"student's has {V}: it cannot score the student's tokens", "teacher",
                            "Teacher and student must share the tokenizer: use a teacher trained "
                            "on the same dataset.tokenizer (and dataset.vocab_size)")
        self.draw_noise_seed()

    # ------------------------------------------------------------------------ randomness
    def seed(self) -> int:
        if self._noise_seed_host is None:   # mirrored on the host once (NoiseSeeded)
            self._noise_seed_host = int(self.noise_seed)
        return self._noise_seed_host

    def on_policy(self, step: int) -> bool:
        """This step's coin (identical on every rank, and on resume)."""
        if self.lmbda in (0.0, 1.0):
            return self.lmbda == 1.0
        return random.Random(derive_seed(COIN_TAG, self.seed(), int(step))).random() < self.lmbda

    def generators(self, step: int, index: torch.Tensor) -> list[torch.Generator]:
        """One CPU generator per sample of the batch, keyed by its training-split index."""
        return [torch.Generator().manual_seed(derive_seed(SAMPLE_TAG, self.seed(), int(step), i))
                for i in index.reshape(-1).tolist()]

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def sample(self, student, batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [B, T]: the student's continuation of each block's prompt to T + 1 tokens,
        targets counted on the generated tokens only."""
        model = getattr(student, "module", student)   # DDP does not forward `generate`
        P, T = self.prompt_tokens, batch.x.shape[1]
        seq = model.generate(batch.x[:, :P], T + 1 - P, temperature=self.sampling_temperature,
                             top_k=self.top_k, generator=self.generators(step, batch.index),
                             last_unfed=True)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :P - 1] = IGNORE_INDEX
        padded = (batch.y[:, :P - 1] == IGNORE_INDEX).any(1)   # the prompt holds <pad>
        y.masked_fill_(padded[:, None], IGNORE_INDEX)
        return x, y

    def train_terms(self, student, forward, teacher, batch, ctx: StepContext):
        """The engine's hook: `teacher` is the run's FrozenTeacher (live: a StepObjective), its
        logits quantised to teacher.outputs_dtype as every live teacher signal."""
        dtype = getattr(teacher, "dtype", "float32")
        return self._terms(student, forward, lambda x: frozen_logits(teacher.model, x, dtype),
                           batch, ctx)

    def step_terms(self, student, teacher, batch, ctx: StepContext):
        """The StepObjective contract with the teacher network itself (float32 logits)."""
        return self._terms(student, student, lambda x: frozen_logits(teacher, x), batch, ctx)

    def _terms(self, student, forward, teacher_logits, batch, ctx: StepContext):
        if self.on_policy(ctx.step):
            x, y = self.sample(student, batch, ctx.step)
            on, gen = 1.0, counted(y).sum()
        else:
            x, y = batch.x, batch.y
            on, gen = 0.0, torch.zeros((), dtype=torch.long, device=y.device)
        t = teacher_logits(x)   # as loss=gkd: the teacher first, then the student
        loss = self.gkd(forward(x).float(), t, y, ctx)["loss"]
        return {"loss": loss, "on_policy": torch.tensor(on, device=loss.device),
                "gen_tokens": gen.to(loss.device, torch.float32)}

    def forward(self, student_logits, teacher_logits, targets, ctx=None):
        """The loss of given logits and targets (`loss=gkd`'s); training goes through
        `train_terms`, which chooses the tokens."""
        return self.gkd(student_logits, teacher_logits, targets, ctx)

    def extra_repr(self) -> str:
        return (f"lmbda={self.lmbda}, sampling_temperature={self.sampling_temperature}, "
                f"top_k={self.top_k}, prompt_tokens={self.prompt_tokens}")


def _vocab(model) -> int | None:
    """A language model's vocabulary size, when it says (GPT: `vocab_size`)."""
    v = getattr(model, "vocab_size", None)
    if v is None and hasattr(model, "lm_head"):
        v = getattr(model.lm_head, "out_features", None)
    return None if v is None else int(v)


def _positive_int(value, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or int(value) < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}", f"loss.{name}", fix)
    return int(value)


def _sampling_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value >= 0):
        raise UserError(f"sampling_temperature must be a finite number >= 0, got {value!r}",
                        "loss.sampling_temperature",
                        "Use 0.9 (TRL's default), 1.0 (the student's own distribution) or "
                        "0 (greedy)")
    return float(value)

