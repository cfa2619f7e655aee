"""DMD2 — Yin et al., NeurIPS 2024 "Improved Distribution Matching Distillation for Fast Image
Synthesis" (METHODS_FAMILIES.md A6; tianweiy/DMD2 `main/edm/edm_guidance.py`,
`edm_unified_model.py`, `main/sd_unified_model.py`, `main/train_edm.py`)."""
from __future__ import annotations

from distill_cli.draws import NoiseSeeded
from distill_cli.losses.base import CriticObjective
from distill_cli.tasks.diffusion.methods.matching import DistributionMatching


class DMD2(DistributionMatching, NoiseSeeded, CriticObjective):
    """DMD without the regression loss, with two time-scale updates and a GAN:

    generator (every `ratio`-th step, DMD2 dfake_gen_update_ratio, 5):
        L_G = L_DM + gan_generator_weight * mean softplus(-D(x_t'))        (3e-3)
    critic (every step; the fake score and its head on the bottleneck):
        L_fake = the teacher's denoising loss on sg(x)  (DMD2: EDM weighting, t over the grid)
        L_D    = mean softplus(D(sg(x)_t'')) + mean softplus(-D(x_real_t'''))
        L_crit = L_fake + gan_critic_weight * L_D                           (1e-2)
    with L_DM the distribution-matching surrogate (matching.py `dm_terms`: grid index
    U{20..980}, g = (mu_fake - mu_real) / mean|x - mu_real|), D's noise at grid indices
    U{0..999} (diffusion_gan_max_timestep 1000), real images = the run's training batch.
    Both networks step after one backward (the critic learns from the samples the generator
    made before its update: DMD2's generator-then-guidance order), the critic's gradient norm
    clipped to 10 (`critic_grad_clip`; the generator's: trainer.grad_clip).
    generator_steps K > 1: DMD2's multi-step generator with backward simulation
    (matching.py `GeneratorSchedule`), sampled by "consistency" (x0, fresh noise, next time).

    Ours, stated: the GAN head reads any bottleneck resolution (matching.py
    `DiscriminatorHead`); the generator is conditioned on the batch's labels (DMD2: random
    labels); the authors' optimiser (AdamW 2e-6, wd 0.01, 500 warm-up steps) sits in the
    recipes, not here. Terms: loss, dm_grad, gan_g, gen_turn, critic_loss, critic_dsm,
    critic_gan, real_logit, fake_logit."""

    name = "dmd2"

    def __init__(self, **matching):
        super().__init__()
        self.init_matching(**matching)
