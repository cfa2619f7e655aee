"""Phased-DMD-inspired few-step distribution matching — Fan et al. 2025 "Phased DMD: Few-step
Distribution Matching Distillation via Score Matching within Subintervals" (METHODS_FAMILIES.md
A9: abstract level only; every concrete choice below is ours and says so)."""
from __future__ import annotations

import torch
from torch import Tensor

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.diffusion.methods.denoising import Denoising
from distill_cli.tasks.diffusion.methods.dmd2 import DMD2
from distill_cli.tasks.diffusion.methods.matching import (
    GRID_POINTS,
    GeneratorSchedule,
    grid_times,
    time_grid,
)


class PhasedSchedule(GeneratorSchedule):
    """DMD2's K-step schedule whose stage s ~ U{0..min(K-1, step // phase_steps)}: phase s joins
    the training at optimizer step s * phase_steps (towards higher SNR), and is trained from then
    on with the phases before it (one shared generator: a phase that stopped training would drift
    as the later ones move the shared weights). phase_steps 0: every phase from the start."""

    def __init__(self, steps, backward_simulation: bool, phase_steps: int):
        super().__init__(steps, backward_simulation)
        self.phase_steps = int(phase_steps)

    def unlocked(self, step: int) -> int:
        """How many phases train at optimizer `step` (>= 1)."""
        if self.phase_steps == 0:
            return self.steps
        return min(self.steps, int(step) // self.phase_steps + 1)

    def stage(self, seed: int, step: int) -> int:
        g = torch.Generator().manual_seed(derive_seed("phased-dmd-stage", seed, step))
        return int(torch.randint(0, self.unlocked(step), (), generator=g))


class PhaseDenoising(Denoising):
    """The fake score's denoising loss with t ~ U(lo, hi] inside the current phase (one U[0, 1)
    draw per sample, as Denoising's uniform times): `interval` is set before each call."""

    interval: tuple[float, float] = (0.0, 1.0)

    def sample_times(self, process, draws) -> Tensor:
        lo, hi = self.interval
        return (hi - (hi - lo) * draws.uniform()).float()


class PhasedDMD(DMD2):
    """A K-step generator (the student: DMD2's multi-step generator with backward simulation,
    times T_s = grid(K)[s], s = 0..K-1, sampled by x0 -> fresh noise -> next time). The teacher's
    time range is split at those times into K phases: phase s = [T_{s+1}, T_s] (the last:
    [t_min, T_{K-1}]). At an optimizer step training stage s (`PhasedSchedule`):

      generator: x = G(z_s, T_s) (z_s from the current generator through stages 0..s-1);
                 L_DM at a grid time inside phase s (grid indices of [T_{s+1}, T_s] intersected
                 with DMD2's U{20..980}); g = (mu_fake - mu_real) / mean|x - mu_real|
      critic:    the fake score's denoising loss on sg(x) at t ~ U(T_{s+1}, T_s] (one draw a
                 sample), + DMD2's GAN loss over its own range when loss.gan=true.

    Why the phase's interval (ours, stated): the sampler re-noises the stage's x-prediction to
    T_{s+1}, and for t >= T_{s+1} the forward process from that intermediate sample has the same
    marginals as x itself noised to t; so matching the noised distributions only at t in
    [T_{s+1}, T_s] matches the distribution of the phase's OUTPUT (the intermediate-noise sample
    the paper's subinterval score matching targets) and leaves the finer scales to the later
    phases. The fake score learns that subinterval's score from x-targets (the standard
    denoising loss; in expectation the same score as the paper's intermediate-sample targets).
    Ours, stated: one shared generator, not one expert per phase (the paper: an MoE of experts,
    LoRA-initialised); phases unlocked progressively, phase s at step s * phase_steps, then
    trained uniformly with the earlier ones; phases split uniformly in the teacher's t (its
    sampling grid; equal log-SNR steps for vp_cosine only approximately); the fake score's
    times uniform in t inside the phase (a lognormal fake_loss is refused); defaults DMD2's
    (ratio 5), no GAN (the abstract names none). Terms: DMD2's, plus `phase` (the stage trained
    this step)."""

    name = "phased_dmd"

    def __init__(self, phase_steps: int = 50, **matching):
        ps = phase_steps
        if isinstance(ps, bool) or not isinstance(ps, (int, float)) or int(ps) != ps or ps < 0:
            raise UserError(f"phase_steps must be an integer >= 0, got {phase_steps!r}",
                            "loss.phase_steps", "Use 0 (every phase from the start) or e.g. "
                            "50 (phase s joins at step 50 s)")
        steps = matching.get("generator_steps", 4)
        if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps == 1:
            raise UserError("phased DMD splits the time range into one phase per generator "
                            "step: it needs loss.generator_steps >= 2", "loss.generator_steps",
                            "Use e.g. loss.generator_steps=4, or loss=dmd2 for one step")
        node = dict(matching.get("fake_loss") or {})
        node.pop("_target_", None)
        if node.get("time_sampling", "uniform") != "uniform":
            raise UserError("phased_dmd draws the fake score's times uniformly inside the "
                            "current phase", "loss.fake_loss.time_sampling",
                            "Use loss.fake_loss.time_sampling=uniform")
        super().__init__(**{"generator_steps": 4, **matching})
        self.schedule = PhasedSchedule(self.schedule.steps, self.schedule.backward_simulation,
                                       int(ps))
        self.fake_loss = PhaseDenoising(**{"name": f"{self.name}.fake_loss", **node})
        self._phase: int | None = None

    # ------------------------------------------------------------------ the phases
    def phase_times(self, process, stage: int) -> tuple[float, float]:
        """(lo, hi) = (T_{s+1} or t_min, T_s) of phase `stage` on the teacher's process."""
        times = [float(v) for v in process.grid(self.schedule.steps)]
        return times[stage + 1], times[stage]   # grid(K)[K] = t_min

    def phase_indices(self, process, stage: int) -> tuple[int, int]:
        """Grid indices of `time_grid` inside phase `stage`, within DMD2's U{min..max}."""
        lo, hi = self.phase_times(process, stage)
        grid = time_grid(process)
        tol = 1e-12
        inside = ((grid >= lo - tol) & (grid <= hi + tol)).nonzero().flatten()
        low = max(int(inside.min()), self.dm_range[0]) if len(inside) else GRID_POINTS
        high = min(int(inside.max()), self.dm_range[1]) if len(inside) else -1
        if low > high:
            raise UserError(f"phase {stage} ([{lo:.4g}, {hi:.4g}]) holds no time of the DM "
                            f"range's grid indices {self.dm_range}", "loss.generator_steps",
                            "Use fewer generator steps, or widen loss.min_step_percent / "
                            "max_step_percent")
        return low, high

    def bind(self, student, teacher, data) -> None:
        super().bind(student, teacher, data)
        process = teacher.process
        for s in range(self.schedule.steps):   # refuse an empty phase before training
            self.phase_indices(process, s)

    # ------------------------------------------------------------------ one step
    def on_stage(self, stage: int, topology) -> None:
        """The fake score learns this step inside the stage's phase."""
        self.fake_loss.interval = self.phase_times(topology.model.process, stage)

    def dm_times(self, process, draws) -> Tensor:
        """DMD's noise times inside the current phase (DMD2's U{20..980} cut to the phase)."""
        return grid_times(process, draws, *self.phase_indices(process, self.stage))

    def step_terms(self, student, topology, batch, ctx) -> dict[str, Tensor]:
        terms = super().step_terms(student, topology, batch, ctx)
        terms["phase"] = torch.tensor(float(self.stage), device=terms["gen_turn"].device)
        return terms

    def extra_repr(self) -> str:
        return f"phase_steps={self.schedule.phase_steps}, " + super().extra_repr()
