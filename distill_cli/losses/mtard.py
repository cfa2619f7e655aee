"""MTARD — multi-teacher adversarial robustness distillation (Zhao et al., ECCV 2022, "Enhanced
Accuracy and Robustness via Multi-Teacher Adversarial Distillation"), with the entropy balance of
the temperatures from its extension (Zhao, Wang & Wei, TPAMI 2024, "Mitigating Accuracy-Robustness
Trade-off via Balanced Multi-Teacher Adversarial Distillation"); official code zhaoshiji123/MTARD
and zhaoshiji123/MTARD-extension. METHODS.md "MTARD" [code].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_cli.evaluation.adversarial import NormalizedModel, check_attack, pgd, pixel_stats
from distill_cli.errors import UserError
from distill_cli.losses.base import PoolObjective, StepContext, StepObjective
from distill_cli.losses.ce import _as_float


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`KL(softmax(t/τ) ‖ softmax(s))` averaged over all B·C elements, the teacher's mean
    entropy `−Σ_c p log p` over the batch (detached)). Only the teacher is temperature-scaled."""
    log_pt = F.log_softmax(_as_float(teacher_logits).detach() / tau.to(teacher_logits.dtype), 1)
    log_ps = F.log_softmax(_as_float(student_logits), 1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).mean()
    entropy = -(log_pt.exp() * log_pt).sum(1).mean()
    return kl, entropy.detach()


class MTARD(StepObjective, PoolObjective):
    """`w_adv·L_adv + w_nat·L_nat`, NO label CE, from a pool of two teachers:

        teachers[0] = the CLEAN (natural) teacher, fed the clean batch x,
        teachers[1] = the ROBUST (adversarially trained) teacher, fed x_adv.

    Per step: x_adv = PGD against the STUDENT in EVAL mode (BatchNorm running statistics, none
    updated), as the official `mtard_inner_loss_ce` (`model.eval()` before the attack loop,
    `model.train()` after; unlike Madry's training-mode attack of `adv_ce`), CE, start
    x + 0.001·N(0, 1) (global torch RNG, checkpointed by the engine), `steps` steps of
    `step_size`, ε-ball ∩ [0, 1] after each, in [0, 1] pixel space (adversarial.py). Then, in the
    official order, student(x_adv) (train mode), robust teacher(x_adv), student(x), clean
    teacher(x), and

        L_adv = KL(softmax(t_rob(x_adv)/τ_adv) ‖ softmax(s(x_adv)))    mean over the B·C elements
        L_nat = KL(softmax(t_cln(x)/τ_nat)     ‖ softmax(s(x)))        (student NOT scaled by τ)

    Loss balance (ECCV 2022): L⁰ = (L_adv, L_nat) of the first batch, r = L/L⁰,
        w_nat ← w_nat − η·(w_nat − r_nat/(r_adv + r_nat)),   w_adv = 1 − w_nat,   start 0.5.
    As in the official code the update uses THIS batch's losses and the updated weights weight
    this batch's loss (the forward computes the update; `after_step` commits it).
    Entropy balance (TPAMI extension), with the teachers' mean entropies H at the CURRENT τ (the
    loss uses τ before the update, as in the official code; `after_step` updates):
        τ_adv ← clip(τ_adv − η_τ·sign(H_adv − H_nat), 1, 10),  τ_nat ← clip(τ_nat + η_τ·sign(…))
    (= the paper's sign(H_a/H_n − 1) for H_n > 0, without its 0/0 when both are one-hot).

    η and η_τ are ×`eta_decay` at each lr decay. "lr decays" = the epochs in `decay_epochs` (the
    YAML reads `scheduler.milestones`, so they are the multistep schedule's decays; a cosine or
    constant schedule has none and η stays constant): a step of epoch e (1-based) uses
    η·eta_decay^#{m ∈ decay_epochs : e > m} — the official code decays after epoch m.
    Differences from the official code: exact KL/entropy from log_softmax (theirs add 1e-5 inside
    the log), the attack start is clamped to [0, 1] like every step, L⁰ is floored at 1e-12.

    w_nat, τ_adv, τ_nat, L⁰ and whether L⁰ is set are float64 buffers (saved in checkpoints).
    Terms: `loss`, `adv_kl`, `nat_kl`, `w_nat`, `w_adv` (weights of this loss), `tau_adv`,
    `tau_nat` (temperatures of this loss), `h_adv`, `h_nat` (teacher entropies driving τ).
    Direct calls: `forward(s_nat, t, y, ctx, student_adv_logits=s_adv)` with t `[2, B, C]`
    (clean, robust) or one `[B, C]` teacher for both; without `student_adv_logits` the student's
    logits serve both views.
    """

    batch_coupling = "its teacher weights adapt to the batch and its attack runs the student itself"
    needs_teacher = True

    def __init__(self, eps=8 / 255, step_size=2 / 255, steps: int = 10,
                 random_start: str | None = "normal_0.001", eta: float = 0.025,
                 eta_tau: float = 0.001, tau_min: float = 1.0, tau_max: float = 10.0,
                 eta_decay: float = 0.1, decay_epochs=()):
        super().__init__()
        self.eps, self.step_size, self.steps = check_attack(eps, step_size, steps, random_start,
                                                            "loss")
        self.random_start = random_start
        for key, value, ok in (("eta", eta, 0 <= float(eta) <= 1),
                               ("eta_tau", eta_tau, float(eta_tau) >= 0),
                               ("eta_decay", eta_decay, 0 < float(eta_decay) <= 1),
                               ("tau_min", tau_min, 0 < float(tau_min) <= float(tau_max))):
            if not ok:
                raise UserError(f"mtard {key}={value} is out of range", f"loss.{key}",
                                "Use the paper's values: eta=0.025 eta_tau=0.001 eta_decay=0.1 "
                                "tau_min=1 tau_max=10")
        self.eta, self.eta_tau, self.eta_decay = float(eta), float(eta_tau), float(eta_decay)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        try:
            self.decay_epochs = sorted(int(m) for m in (decay_epochs or ()))
        except (TypeError, ValueError):
            raise UserError(f"mtard decay_epochs must be a list of epochs, got {decay_epochs!r}",
                            "loss.decay_epochs", "Use e.g. [215, 260, 285], or [] for none"
                            ) from None
        f64 = {"dtype": torch.float64}
        self.register_buffer("w_nat", torch.tensor(0.5, **f64))
        tau0 = min(max(1.0, self.tau_min), self.tau_max)   # the paper's start, 1
        self.register_buffer("tau_adv", torch.tensor(tau0, **f64))
        self.register_buffer("tau_nat", torch.tensor(tau0, **f64))
        self.register_buffer("l0", torch.zeros(2, **f64))           # (L_adv, L_nat) of batch 1
        self.register_buffer("l0_set", torch.tensor(0.0, **f64))    # 1 once L⁰ is recorded
        self._pixels: tuple | None = None

    # ------------------------------------------------------------------ the launcher's pool API
    @property
    def teacher_weights(self) -> torch.Tensor:
        """Per pool entry (clean, robust): the current (w_nat, w_adv)."""
        return torch.stack([self.w_nat, 1 - self.w_nat]).float()

    def set_scores(self, scores) -> None:
        """The pool's similarity scores are not used: MTARD balances its teachers by loss."""

    def bind(self, student, teacher, data) -> None:
        if not isinstance(teacher, (list, tuple)) or len(teacher) != 2:
            n = len(teacher) if isinstance(teacher, (list, tuple)) else 1
            raise UserError(f"loss=mtard needs exactly two teachers, [clean, robust]; got {n}",
                            "teachers", "Pass 'teachers=[{arch: A, checkpoint: clean.pt}, "
                            "{arch: B, checkpoint: robust.pt}]' (entry 0 clean, entry 1 robust)")
        self._pixels = pixel_stats(data.train, "loss")

    # ------------------------------------------------------------------ the update rules
    def decays(self, ctx: StepContext | None) -> int:
        return 0 if ctx is None else sum(ctx.epoch > m for m in self.decay_epochs)

    def balanced_w_nat(self, adv_kl: torch.Tensor, nat_kl: torch.Tensor,
                       ctx: StepContext | None) -> torch.Tensor:
        """w_nat after this batch's update (pure: reads the buffers, writes nothing)."""
        L = torch.stack([adv_kl.detach(), nat_kl.detach()]).to(self.l0)
        l0 = torch.where(self.l0_set > 0, self.l0, L).clamp_min(1e-12)
        r = L / l0
        eta = self.eta * self.eta_decay ** self.decays(ctx)
        return self.w_nat - eta * (self.w_nat - r[1] / (r[0] + r[1]))

    # ------------------------------------------------------------------ objective
    def forward(self, student_logits: torch.Tensor, teacher_logits, targets=None,
                ctx: StepContext | None = None, *,
                student_adv_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            raise ValueError("mtard needs teacher logits (clean, robust), got None")
        t = torch.stack(list(teacher_logits)) if isinstance(teacher_logits, (list, tuple)) \
            else teacher_logits
        t = t.unsqueeze(0).expand(2, *t.shape) if t.dim() == 2 else t
        s_adv = student_logits if student_adv_logits is None else student_adv_logits
        if t.shape[0] != 2 or t.shape[1:] != student_logits.shape or s_adv.shape != t.shape[1:]:
            raise ValueError(f"mtard wants teacher logits [2, B, C] (clean, robust) and student "
                             f"logits [B, C]; got {tuple(t.shape)}, {tuple(student_logits.shape)}")
        adv_kl, h_adv = soft_kl(s_adv, t[1], self.tau_adv)
        nat_kl, h_nat = soft_kl(student_logits, t[0], self.tau_nat)
        w_nat = self.balanced_w_nat(adv_kl, nat_kl, ctx)
        w_adv = 1 - w_nat
        loss = w_adv.to(adv_kl.dtype) * adv_kl + w_nat.to(nat_kl.dtype) * nat_kl
        return {"loss": loss, "adv_kl": adv_kl.detach(), "nat_kl": nat_kl.detach(),
                "w_nat": w_nat, "w_adv": w_adv, "tau_adv": self.tau_adv.clone(),
                "tau_nat": self.tau_nat.clone(), "h_adv": h_adv, "h_nat": h_nat}

    @torch.no_grad()
    def after_step(self, terms: dict[str, torch.Tensor], ctx: StepContext) -> None:
        """Commit this step's weight update (the one its loss used), record L⁰ on the first
        step, then move the temperatures by the entropy rule. Device ops only (no sync)."""
        adv_kl, nat_kl = terms["adv_kl"], terms["nat_kl"]
        self.w_nat.copy_(self.balanced_w_nat(adv_kl, nat_kl, ctx))
        L = torch.stack([adv_kl, nat_kl]).to(self.l0)
        self.l0.copy_(torch.where(self.l0_set > 0, self.l0, L))
        self.l0_set.fill_(1.0)
        step = self.eta_tau * self.eta_decay ** self.decays(ctx)
        d = torch.sign(terms["h_adv"].to(self.l0) - terms["h_nat"].to(self.l0))
        self.tau_adv.copy_((self.tau_adv - step * d).clamp(self.tau_min, self.tau_max))
        self.tau_nat.copy_((self.tau_nat + step * d).clamp(self.tau_min, self.tau_max))

    def step_terms(self, student, teacher, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self._pixels is None:
            raise RuntimeError("MTARD.bind(student, teachers, data) was not called")
        clean_teacher, robust_teacher = teacher
        model = NormalizedModel(student, *self._pixels, batch.x.device)
        x_adv01 = pgd(model, model.pixels(batch.x), batch.y, self.eps, self.step_size,
                      self.steps, self.random_start)
        x_adv = model.normalize(x_adv01)
        s_adv = student(x_adv).float()            # train mode again (pgd restored it)
        with torch.no_grad():
            t_adv = robust_teacher(x_adv).float()
        s_nat = student(batch.x).float()
        with torch.no_grad():
            t_nat = clean_teacher(batch.x).float()
        return self(s_nat, torch.stack([t_nat, t_adv]), batch.y, ctx, student_adv_logits=s_adv)

    def extra_repr(self) -> str:
        return (f"eps={self.eps:.5f}, step_size={self.step_size:.5f}, steps={self.steps}, "
                f"random_start={self.random_start}, eta={self.eta}, eta_tau={self.eta_tau}, "
                f"tau=[{self.tau_min}, {self.tau_max}], eta_decay={self.eta_decay}, "
                f"decay_epochs={self.decay_epochs}")
