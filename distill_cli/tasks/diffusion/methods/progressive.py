"""Progressive distillation (Salimans & Ho, ICLR 2022), METHODS_FAMILIES.md A1.

Also home of the few helpers the four step-distillation methods share (`unwrap`,
`check_denoiser`, `copy_teacher_weights`, `frozen_copy`, `adopt_teacher_guidance`): the design
gives each method one file, and this is the first of them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_cli.draws import NoiseSeeded
from distill_cli.errors import UserError
from distill_cli.losses.base import StepContext, StepObjective
from distill_cli.models.diffusion.denoiser import Denoiser
from distill_cli.tasks.diffusion.methods.common import (
    adopt_teacher_guidance,
    check_denoiser,
    col,
    copy_teacher_weights,
    frozen_copy,
    per_sample_mean,
    positive_int,
    power_of_two,
    unwrap,
)

WEIGHTINGS = ("snr_trunc", "v_mse")


# ----------------------------------------------------------------------------- the target
@torch.no_grad()
def two_step_target(teacher: Denoiser, guidance: float | None, z: Tensor, t: Tensor,
                    t_mid: Tensor, t_next: Tensor, y: Tensor | None, last: Tensor) -> Tensor:
    """PD's x̃: the x whose ONE DDIM step from (z, t) lands on the teacher's TWO DDIM steps
    t -> t_mid -> t_next, for any affine process z = a x + s eps (times [B] float64):

        z' = a' x̂1 + s' ε̂1,  z'' = a'' x̂2 + s'' ε̂2                  (teacher, no clipping)
        z'' = a'' x̃ + s'' (z - a x̃)/s  =>  x̃ = (z'' - (s''/s) z) / (a'' - (s''/s) a)

    and x̃ = x̂2 on the LAST student step (`last`, t_next = t_min), where s'' = 0 (or nearly:
    vp_cosine's s(0) = 4.5e-5) makes the formula degenerate (PD dpm.py, the i = 0 branch)."""
    p = teacher.process
    x1, e1 = teacher.predict(z, t, y, guidance)
    z_mid = col(p.a(t_mid), z) * x1.to(z.dtype) + col(p.s(t_mid), z) * e1.to(z.dtype)
    x2, e2 = teacher.predict(z_mid, t_mid, y, guidance)
    x2, e2 = x2.to(z.dtype), e2.to(z.dtype)
    z_next = col(p.a(t_next), z) * x2 + col(p.s(t_next), z) * e2
    ratio = p.s(t_next) / p.s(t)                      # float64 coefficients
    denom = p.a(t_next) - ratio * p.a(t)              # > 0: the SNR grows towards the data
    x_tilde = (z_next - col(ratio, z) * z) / col(denom, z)
    return torch.where(col(last, z).bool(), x2, x_tilde)


# ----------------------------------------------------------------------------- the objective
class Progressive(NoiseSeeded, StepObjective):
    """Progressive distillation: a student with N steps matches its teacher's 2N DDIM steps
    two at a time; after each round the student becomes the teacher and N halves.

    Per example (PD dpm.py `Model.training_losses`, distillation branch; model.py `loss_fn`):
        k ~ U{0..N-1}, on the teacher grid g = process.grid(2N) (t_max -> t_min):
        t = g[2k], t' = g[2k+1], t'' = g[2k+2];  eps ~ N(0, I);  z = a(t) x + s(t) eps
        x̃ = two_step_target(...) (above; x̃ = x̂2 on the last step k = N-1)
        ε̃ = (z - a x̃)/s,  ṽ = a ε̃ - s x̃;  (x̂, ε̂) = student(z, t),  v̂ = a ε̂ - s x̂
        x_mse = mean_dims (x̂ - x̃)^2
        snr_trunc: L = max(1, a²/s²) · x_mse        (PD's 'snr_trunc', all its distill configs)
        v_mse:     L = mean_dims (v̂ - ṽ)^2          (PD's 'v_mse', "SNR+1")
    loss = batch mean. Draws, per sample from `SampleDraws(noise_seed, step, batch.index)`
    (methods/common.py: one stream per (seed, step, sample), so torchrun ranks holding slices of
    the global batch draw what one process draws), in this fixed order: k (one integer), then
    eps (N(0, I) of the image's shape). `noise_seed` is a buffer drawn once in `bind` from the
    default RNG (seeded with cfg.seed).

    Rounds: rounds = log2(start_steps/end_steps); the teacher has N_r = start_steps/2^r steps
    in round r and the student N_r/2; each round lasts `steps_per_round` optimizer steps (auto:
    total_steps // rounds, the last round also takes the remainder). Round 0's teacher is the
    stored teacher (with its guidance); round r > 0's is the student's weights at the end of
    round r - 1, kept in `self.snapshot` (a frozen copy whose tensors are buffers: in the
    checkpoint, not trained) and run at guidance 1. The round counter is the buffer `round`.

    Choices that differ from the authors (PD; CM's EDM variant karras_diffusion.py:241-332):
    - any affine process (PD: VP cosine only): x̃ solves the same one-DDIM-step equation with
      a, s of the teacher's process; the grid is the process's own (uniform t for VP/flow: PD's
      t = (i+1)/N; the rho-grid for edm). The student runs on the TEACHER's process.
    - v: the generalised v = a eps - s x (= PD's when a² + s² = 1); x̂ = (a z - s v̂)/(a² + s²).
    - the network's time input is the Denoiser's (1000 t; PD: log-SNR).
    - one run trains all rounds with the run's optimizer and scheduler (PD restarts Adam and
      its linear LR anneal every round; the outer driver is not released, METHODS_FAMILIES A1).
    - a guided teacher (task.guidance != 1) is distilled into a student that samples at w = 1.
    Terms: loss, x_mse, round, student_steps.
    """

    task_name = "diffusion"
    batch_coupling = None

    def __init__(self, start_steps: int | None = None, end_steps: int = 1,
                 steps_per_round="auto", param: str = "v", weighting: str = "snr_trunc"):
        super().__init__()
        self.end_steps = positive_int(end_steps, "loss.end_steps")
        self.start_steps = self.rounds = None
        if start_steps is not None:   # else the teacher's own step count, read in bind
            self._set_start(positive_int(start_steps, "loss.start_steps"), "loss.start_steps")
        if steps_per_round != "auto":
            steps_per_round = positive_int(steps_per_round, "loss.steps_per_round")
        self.steps_per_round = steps_per_round
        if param not in ("v", "x0", "eps"):
            raise UserError(f"unknown student parameterisation {param!r} for progressive "
                            "distillation", "loss.param", "Use v (PD's choice), x0 or eps")
        self.param = param
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown weighting {weighting!r}", "loss.weighting",
                            f"Use one of: {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self.snapshot: nn.Module | None = None
        self._round_host: int | None = None   # `round` mirrored on the host (no sync per step)
        self.init_noise_seed()

    def _set_start(self, start: int, key: str) -> None:
        end = self.end_steps
        if not (start > end and start % end == 0 and power_of_two(start // end)):
            raise UserError(
                f"progressive distillation halves the step count each round, so start_steps/"
                f"end_steps must be a power of two >= 2; got {start}/{end}", key,
                "Use powers of two, e.g. loss.start_steps=64 loss.end_steps=1 (PD: 8192 -> 1 "
                "on CIFAR-10, 1024 -> 1 on ImageNet 64)")
        self.start_steps = start
        self.rounds = (start // end).bit_length() - 1   # log2 of a power of two

    # ---- setup ------------------------------------------------------------------------------
    def bind(self, student, teacher, data) -> None:
        model = check_denoiser(student, "student", "progressive")
        teacher = check_denoiser(teacher, "teacher", "progressive")
        if self.start_steps is None:   # round 0 distils the teacher's own sampler
            self._set_start(int(teacher.steps), "task.steps")
        copy_teacher_weights(model, teacher, "progressive")
        # evaluated (validation selects best.pt) at the FINAL step count in every round, so
        # best is never an early round's student judged with more steps than it ends with
        model.set_diffusion(process=teacher.process, param=self.param, sampler="ddim",
                            steps=self.end_steps)
        adopt_teacher_guidance(model, teacher)
        self.snapshot = frozen_copy(model).eval()
        self.draw_noise_seed()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._round_host = int(self.round)
        return result

    def round_at(self, ctx: StepContext) -> int:
        """The round of optimizer step `ctx.step` (the last round keeps the remainder)."""
        per = self.steps_per_round
        if per == "auto":
            per = ctx.total_steps // self.rounds
            if per < 1:
                raise UserError(
                    f"progressive distillation from {self.start_steps} to {self.end_steps} steps "
                    f"needs {self.rounds} rounds, but the run has only {ctx.total_steps} "
                    "optimizer steps", "loss.steps_per_round",
                    "Train longer (trainer.epochs) or distil fewer rounds (loss.start_steps)")
        elif per * self.rounds > ctx.total_steps:
            raise UserError(
                f"{self.rounds} rounds of loss.steps_per_round={per} need {per * self.rounds} "
                f"optimizer steps, but the run has {ctx.total_steps}: the last rounds would never "
                "run", "loss.steps_per_round",
                "Use loss.steps_per_round=auto (total steps // rounds) or train longer")
        return min(ctx.step // per, self.rounds - 1)

    # ---- one step ---------------------------------------------------------------------------
    def step_terms(self, student, teacher, batch, ctx):
        model = unwrap(student)
        r = self.round_at(ctx)
        if self._round_host is None:
            self._round_host = int(self.round)
        if r != self._round_host:   # a round boundary: the student becomes the teacher
            with torch.no_grad():
                self.snapshot.load_state_dict(model.state_dict())
            self.round.fill_(r)
            self._round_host = r
        teacher_steps = self.start_steps // 2 ** r
        n = teacher_steps // 2      # this round's student steps (it is sampled at end_steps)
        if r == 0:
            t_model, guidance = check_denoiser(teacher, "teacher", "progressive"), None
        else:
            t_model, guidance = self.snapshot.eval(), 1.0
        x, y = batch.x, batch.y
        p = model.process
        grid = p.grid(teacher_steps).to(x.device)
        draws = self.draws(batch, ctx)     # the order below is the docstring's
        k = draws.integers(n)
        eps = draws.normal(*x.shape[1:], dtype=x.dtype)
        t, t_mid, t_next = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
        a, s = p.a(t), p.s(t)
        z = col(a, x) * x + col(s, x) * eps
        x_tilde = two_step_target(t_model, guidance, z, t, t_mid, t_next, y, k == n - 1)
        x_hat, eps_hat = student(z, t, y, output="x_eps")   # the (DDP-)wrapped student
        x_hat, eps_hat = x_hat.to(x.dtype), eps_hat.to(x.dtype)
        x_mse = per_sample_mean((x_hat - x_tilde) ** 2)
        if self.weighting == "snr_trunc":
            losses = torch.clamp((a / s) ** 2, min=1.0).to(x_mse.dtype) * x_mse
        else:
            eps_tilde = (z - col(a, x) * x_tilde) / col(s, x)
            v_tilde = col(a, x) * eps_tilde - col(s, x) * x_tilde
            v_hat = col(a, x) * eps_hat - col(s, x) * x_hat
            losses = per_sample_mean((v_hat - v_tilde) ** 2)
        return {"loss": losses.mean(), "x_mse": x_mse.mean().detach(),
                "round": torch.tensor(float(r), device=x.device),
                "student_steps": torch.tensor(float(n), device=x.device)}

    def extra_repr(self) -> str:
        return (f"start_steps={self.start_steps}, end_steps={self.end_steps}, rounds="
                f"{self.rounds}, steps_per_round={self.steps_per_round}, param={self.param}, "
                f"weighting={self.weighting}")


