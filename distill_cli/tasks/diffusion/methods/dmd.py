"""Distribution Matching Distillation — Yin et al., CVPR 2024 "One-step Diffusion with
Distribution Matching Distillation" (METHODS_FAMILIES.md A5). No official DMD code exists; the
distribution-matching gradient is the one the authors' DMD2 repository implements (A6,
tianweiy/DMD2 `main/edm/edm_guidance.py`), the regression loss is the paper's."""
from __future__ import annotations

import torch
from torch import Tensor

from distill_cli.draws import NoiseSeeded
from distill_cli.errors import UserError
from distill_cli.losses.base import CriticObjective
from distill_cli.models.diffusion.samplers import initial_noise
from distill_cli.models.taps import FeatureTaps
from distill_cli.tasks.diffusion.methods.common import (
    StoredPairs,
    distance,
    pair_batch,
    unwrap,
)
from distill_cli.tasks.diffusion.methods.matching import DistributionMatching

DISTANCES = ("features", "pseudo_huber", "l2")


class DMD(DistributionMatching, StoredPairs, NoiseSeeded, CriticObjective):
    """One-step generator G (the student, initialised from the teacher, evaluated at t_max on
    s(t_max) z), trained by

        L = L_DM + reg_weight * L_reg

    L_DM: x = G(z); t at a grid index ~ U{20..980}; x_t = a(t) x + s(t) eps;
          g = (mu_fake(x_t) - mu_real(x_t)) / mean_CHW |x - mu_real(x_t)|;
          L_DM = 0.5 mean (x - sg(x - g))^2  (gradient g / (B C H W) on x; DMD2's form of the
          paper's (s_fake - s_real) w_t gradient, METHODS_FAMILIES.md A5)
    L_reg: mean over the batch of d(G(z_i), y_i) on the teacher's stored (noise, ODE endpoint)
          pairs (z_i, y_i) of the batch's samples (teachers/pairs.py, sampled once into the
          output store with the teacher's own deterministic sampler, as the paper's regression
          set).
    The fake score mu_fake (a copy of the teacher) learns online, once per generator step, by
    the teacher's own denoising loss on sg(G(z)) (`fake_loss`). No GAN (DMD2 adds it).

    Ours, stated: d is not LPIPS (its VGG weights cannot be fetched offline). `features` (the
    default) is LPIPS' form in the task's stored feature classifier (the one FD is measured
    in): every stage's activations unit-normalised over channels, squared differences summed
    over channels, averaged over positions, summed over stages, with LPIPS' learned per-channel
    weights replaced by 1; `pseudo_huber` / `l2` are pixel distances (methods/common.py). The
    regression pairs are those of the batch's own training indices (the paper draws a separate
    regression batch). reg_weight 0.25 is the paper's lambda_reg as recalled [unverified].
    Terms: loss, dm_grad (mean |g|), reg, gen_turn, critic_loss, critic_dsm."""

    name = "dmd"

    def __init__(self, reg_weight: float = 0.25, reg_distance: str = "features",
                 huber_c=None, pairs=None, **matching):
        super().__init__()
        if reg_distance not in DISTANCES:
            raise UserError(f"unknown regression distance {reg_distance!r}",
                            "loss.reg_distance", f"Use one of: {', '.join(DISTANCES)}")
        if matching.get("generator_steps", 1) != 1:
            raise UserError("DMD trains a ONE-step generator (its regression pairs map noise at "
                            "t_max to the teacher's endpoint)", "loss.generator_steps",
                            "Use loss.generator_steps=1, or loss=dmd2 for a multi-step "
                            "generator")
        self.reg_weight, self.reg_distance = float(reg_weight), reg_distance
        self.huber_c = huber_c
        self.init_pairs(pairs)
        self.init_matching(**matching)
        self._features = None   # (classifier, mean, std): the stored feature classifier

    def use_stored(self, name: str, model, data) -> None:
        """The runner hands over the task's stored models (the diffusion task's feature
        classifier) with the data its pixels are normalised by."""
        self._features = (model, data.train._mean, data.train._std)

    def feature_distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self._features is None:
            raise UserError("loss.reg_distance=features reads the task's stored feature "
                            "classifier, but the run has none", "loss.reg_distance",
                            "Keep task.feature_net (conf/task/diffusion.yaml), or use "
                            "loss.reg_distance=pseudo_huber")
        net, mean, std = self._features
        pixels = torch.cat([a, b]).add(1.0).div(2.0)          # [-1, 1] -> [0, 1], as FD's
        with FeatureTaps(net, net.stages) as taps:
            net((pixels - mean) / std)
            feats = [taps[p] for p in net.stages]
        total = 0.0
        for f in feats:
            f = f.float().flatten(2) if f.dim() > 2 else f.float().unsqueeze(2)   # [2B, C, P]
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fa, fb = f.chunk(2)
            total = total + (fa - fb).pow(2).sum(1).mean(1)
        return total

    def generator_terms(self, x, student, topology, batch, draws):
        terms = super().generator_terms(x, student, topology, batch, draws)
        if self.reg_weight:
            core = unwrap(topology.model)
            noise, target = pair_batch(self, batch, x.dtype)
            z = initial_noise(core.process, noise)
            y = batch.y if core.conditional else None
            x_reg = student(z, core.process.t_max, y, output="x_eps")[0].float()
            d = (self.feature_distance(x_reg, target.float()) if self.reg_distance == "features"
                 else distance(x_reg, target.float(), self.reg_distance, self.huber_c))
            reg = d.mean()
            terms["loss"] = terms["loss"] + self.reg_weight * reg
            terms["reg"] = reg.detach()
        return terms
