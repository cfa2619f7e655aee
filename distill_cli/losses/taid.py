"""Temporally Adaptive Interpolated Distillation (TAID, SakanaAI, ICLR 2025), as METHODS.md
"TAID" [code: SakanaAI/TAID `src/distil_losses/taid.py`]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.losses.base import Objective, StepContext
from distill_cli.losses.functional import as_float, check_labels, check_pair, soft_cross_entropy

SCHEDULES = ("adaptive", "linear", "scaled")
# `scaled`: the official α is calibrated so that t ≈ 0.95 after ~10k steps; we rescale it so
# the adaptive push covers the same fraction of ANY run: α_eff = min(1, α·10000/total_steps).
SCALED_REFERENCE_STEPS = 10_000
_EPS = 1e-15  # in δ = (J_prev − J)/(J_prev + 1e-15), as the official code


class TAID(Objective):
    """TAID: `ce_weight·CE(s, y) − mean_i Σ_c p_c·log_softmax(s)_c` with the interpolated target

        p = softmax((1 − t)·stopgrad(s) + t·teacher)

    (interpolation in LOGIT space, the student side detached, no temperature). At t = 1 this is
    soft-label CE against softmax(teacher); its gradient w.r.t. s is (softmax(s) − p)/B for any t.
    CE is the plain hard-label CE, off by default (`ce_weight = 0`, as the official code).

    The schedule of t (never learned): `t`, the momentum `m`, the previous loss `J_prev` and a
    `started` flag are BUFFERS, so `state_dict()` — hence every checkpoint — carries them.
    `after_step(terms, ctx)` updates them once per optimizer step, from J = `terms["taid"]` (the
    TAID term before `ce_weight·CE`, as the official code feeds its distillation loss):

    - first call: only record J_prev = J (t and m unchanged);
    - then δ = (J_prev − J)/(J_prev + 1e-15), m ← β·m + (1 − β)·δ, J_prev ← J,
      t_lin = t_start + (t_end − t_start)·ctx.step/ctx.total_steps (ctx.step = the 0-based
      step just taken, the official `trainer.global_step`), and per `schedule`:
        adaptive: t ← min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))   (official constants);
        scaled:   the same with α_eff = min(1, α·10000/total_steps). With a fixed α the push
                  alone brings t to ≈ 0.95 after ~10k steps whatever the run length (a 1k-step
                  run barely moves off the ramp, a 100k-step run saturates in its first tenth);
                  α_eff gives every run the push profile, as a function of training progress,
                  that the official α gives a 10k-step run;
        linear:   t ← min(t_end, t_lin) — the pure ramp, no momentum term (m is still tracked
                  and logged).
    All of it is tensor ops on the buffers (no `.item()`: no host-device sync on a GPU); the
    buffers are float64 so that t is not rounded to float32 at every step.

    Deviation from the official code: it updates t inside `forward`, so also on every
    VALIDATION batch (validation losses move t); here t moves only in `after_step`, once per
    optimizer step, never in evaluation. Calling `forward` without a ctx (evaluation, unit use)
    uses the current t.

    Options (official defaults): t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99;
    schedule adaptive | linear | scaled; ce_weight 0.0.

    Terms: `loss`; `taid` (the interpolated CE, before ce_weight); `ce` (only when
    ce_weight > 0); `t` and `momentum` (the values used for this step). `uses_labels` is
    False unless ce_weight > 0 (then `targets` are never read and may be None).
    """

    batch_coupling = "its interpolation t adapts to the loss values of the batch"
    needs_teacher = True
    uses_labels = False

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, schedule: str = "adaptive", ce_weight: float = 0.0):
        super().__init__()
        t_start, t_end, alpha, beta, ce_weight = map(float, (t_start, t_end, alpha, beta,
                                                             ce_weight))
        if not 0.0 <= t_start < 1.0:
            raise UserError(f"TAID t_start must be in [0, 1), got {t_start}", key="loss.t_start",
                            fix="use e.g. 0.4 (official)")
        if not (0.0 < t_end <= 1.0 and t_end >= t_start):
            raise UserError(f"TAID t_end must be in (0, 1] and >= t_start={t_start}, got {t_end}",
                            key="loss.t_end", fix="use e.g. 1.0 (official)")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"TAID alpha must be in [0, 1], got {alpha}", key="loss.alpha",
                            fix="use e.g. 5e-4 (official)")
        if not 0.0 <= beta < 1.0:
            raise UserError(f"TAID beta must be in [0, 1), got {beta}", key="loss.beta",
                            fix="use e.g. 0.99 (official)")
        if schedule not in SCHEDULES:
            raise UserError(f"TAID schedule must be one of {', '.join(SCHEDULES)}, "
                            f"got {schedule!r}", key="loss.schedule",
                            fix="use adaptive (official), scaled or linear")
        if ce_weight < 0:
            raise UserError(f"TAID ce_weight must be >= 0, got {ce_weight}", key="loss.ce_weight",
                            fix="use 0 (official) or a positive weight")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.schedule = schedule
        self.ce_weight = ce_weight
        self.uses_labels = ce_weight > 0
        f64 = torch.float64
        self.register_buffer("t", torch.tensor(t_start, dtype=f64))
        self.register_buffer("momentum", torch.zeros((), dtype=f64))
        self.register_buffer("prev_loss", torch.zeros((), dtype=f64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ loss
    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                targets: torch.Tensor | None, ctx: StepContext | None = None
                ) -> dict[str, torch.Tensor]:
        check_pair(student_logits, teacher_logits)
        s = as_float(student_logits)
        tl = as_float(teacher_logits).detach()
        t = self.t.to(s.dtype)
        with torch.no_grad():
            target = F.softmax((1 - t) * s.detach() + t * tl, dim=1)
        taid = soft_cross_entropy(s, target).mean()
        terms = {"taid": taid.detach()}
        loss = taid
        if self.ce_weight > 0:
            check_labels(s, targets)
            ce = F.cross_entropy(s, targets)
            loss = loss + self.ce_weight * ce
            terms["ce"] = ce.detach()
        # copies: after_step updates the buffers in place after this step's terms are returned
        terms["t"] = self.t.to(dtype=taid.dtype, copy=True)
        terms["momentum"] = self.momentum.to(dtype=taid.dtype, copy=True)
        return {"loss": loss, **terms}

    # ------------------------------------------------------------------ schedule of t
    def alpha_eff(self, total_steps: int) -> float:
        if self.schedule == "scaled":
            return min(1.0, self.alpha * SCALED_REFERENCE_STEPS / max(int(total_steps), 1))
        return self.alpha

    @torch.no_grad()
    def after_step(self, terms: dict[str, torch.Tensor], ctx: StepContext) -> None:
        J = terms["taid"].detach().to(device=self.prev_loss.device, dtype=self.prev_loss.dtype)
        started = self.started
        delta = (self.prev_loss - J) / (self.prev_loss + _EPS)
        m = self.beta * self.momentum + (1 - self.beta) * delta
        t_lin = self.t_start + (self.t_end - self.t_start) * ctx.step / max(ctx.total_steps, 1)
        if self.schedule == "linear":
            t = torch.full_like(self.t, min(self.t_end, t_lin))
        else:
            push = self.t + self.alpha_eff(ctx.total_steps) * torch.sigmoid(m) * (1 - self.t)
            t = torch.minimum(torch.maximum(push, torch.full_like(push, t_lin)),
                              torch.full_like(push, self.t_end))
        # first call (started == False): only record J
        self.momentum.copy_(torch.where(started, m, self.momentum))
        self.t.copy_(torch.where(started, t, self.t))
        self.prev_loss.copy_(J)
        self.started.fill_(True)

    def extra_repr(self) -> str:
        return (f"t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
                f"beta={self.beta}, schedule={self.schedule}, ce_weight={self.ce_weight}")
