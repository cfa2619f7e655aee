"""DataDAM — Dataset Distillation with Attention Matching (Sajedi et al., ICCV 2023),
METHODS_FAMILIES.md C5.

    a(A)   = F.normalize(flatten(Σ_channels |A|^p))          per image, p = 1
    SAM_l  = Σ_c ‖ mean_{x ∈ B_c} a(A_l(x)) − mean_{s ∈ S_c} a(A_l(s)) ‖²
    MMD    = Σ_c ‖ mean_{x ∈ B_c} φ(x) − mean_{s ∈ S_c} φ(s) ‖²
    L      = w · ( Σ_{l < last} SAM_l + λ · MMD ),    w = 100, λ = task_balance = 0.01

A_l = the output of the l-th activation module of `net.features` of a FRESH random ConvNet per
update (frozen, train mode), every layer except the last (its information is in the embedding
term); φ = the flattened final features (`net.embed`); real and synthetic class batches go through
one Siamese DSA transformation per class, as DM (dm.py).

Source: DataDistillation/DataDAM@0f6ea09e — main_DataDAM.py:150-177 forward hooks on every
`nn.ReLU` of `features` storing `op.clone()`; :232-235 fresh frozen net in train mode; :273-283
Siamese `DiffAugment` per class with one seed; :290-296 one forward of all real images (detached)
and one of all synthetic ones; :301-308 `100 * error(get_attention(real_l, param=1, exp=1,
norm='l2'), get_attention(syn_l, ...), "MSE_B")` for `layer in range(len - 1)`; :310 `100 *
task_balance * error(output_real, output_syn, "MSE_B")` on `net(x)[0]` (the embedding);
utils.py:17-31 `get_attention` (Σ_c |A|^exp over channels, `view(B, -1)`, `F.normalize(p=2)`).
"MSE_B" (main_DataDAM.py:253-254) = Σ over classes AND map positions of the squared gap of the
per-class means (a sum, not a mean: the map size is not divided out).
Ours: per-class means computed by class mask (the authors reshape to [classes, batch_real, -1], so
every class batch must be full); the authors' error moves tensors to the CPU (numerics only);
non-BN networks run one class at a time (equal for instance norm, less memory), BN networks
all classes at once as the authors; randomness from seeded generators (dm.py `Matching`).
Terms logged: `loss`, `sam` (Σ_l SAM_l, before w), `mmd` (before w·λ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill_cli.errors import UserError
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.methods.dm import (
    Matching,
    by_class,
    has_batchnorm,
    mean_gap,
)

# the activation modules whose outputs are the attention layers (the authors hook nn.ReLU; the
# zoo's other activations count too, so act=leakyrelu/... nets work)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish)


def attention_map(feat: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """`F.normalize(flatten(Σ_c |A_c|^p), dim=1)`: [B, C, H, W] → [B, H·W], in float32
    (DataDAM utils.py get_attention, param=1, norm='l2'; eps 1e-12)."""
    return F.normalize(feat.float().abs().pow(p).sum(dim=1).flatten(1), p=2.0, dim=1)


def activation_modules(net: nn.Module) -> list[nn.Module]:
    """The activation modules of `net.features`, in forward order (the hooked layers)."""
    features = getattr(net, "features", None)
    if features is None:
        return []
    return [m for m in features.modules() if isinstance(m, ACTIVATIONS)]


class DataDAM(Matching):
    """DataDAM: `w·(Σ_{l<last} SAM_l + λ·MMD)` (module docstring)."""

    method = "datadam"

    def __init__(self, net=None, seed: int = 0, dsa_strategy: str = dsa.STRATEGY_DEFAULT,
                 weight: float = 100.0, task_balance: float = 0.01, attention_p: float = 1.0):
        super().__init__(net, seed, dsa_strategy)
        self.weight = self._weight("weight", weight)
        self.task_balance = self._weight("task_balance", task_balance)
        self.attention_p = self._weight("attention_p", attention_p)
        if self.attention_p == 0:
            raise UserError("loss.attention_p=0 makes every attention map constant",
                            "loss.attention_p", "Use p > 0 (the authors: 1)")

    def check(self, net: nn.Module) -> None:
        super().check(net)
        if not activation_modules(net):
            raise UserError(f"loss=datadam hooks the activations of the network's `features`, "
                            f"but {type(net).__name__} has none", "task.net",
                            "Use task.net.arch=convnet with an activation (act: relu)")

    def features(self, net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """`[A_1, ..., A_L, φ(x)]`: every hooked activation output, then the embedding."""
        taps: list[torch.Tensor] = []
        # clone: an in-place op after the activation would otherwise change the stored map
        hooks = [m.register_forward_hook(lambda _m, _i, out: taps.append(out.clone()))
                 for m in activation_modules(net)]
        try:
            emb = net.embed(x)
        finally:
            for h in hooks:
                h.remove()
        return [*taps, emb]

    def step_terms(self, student, teacher, batch, ctx):
        net = self.fresh_net(ctx.step, student.images.device)
        real, syn = self.class_pairs(student, batch, ctx.step)
        joint = has_batchnorm(net)
        run = lambda x: self.features(net, x)
        with torch.no_grad():   # the real side is constant (the authors' .detach())
            f_real = by_class(run, real, joint)
        f_syn = by_class(run, syn, joint)
        layers = len(f_syn[0]) - 1                 # hooked activations; the last entry is φ
        sam = f_syn[0][-1].new_zeros((), dtype=torch.float32)
        for layer in range(layers - 1):            # every hooked layer except the last
            sam = sam + mean_gap([attention_map(f[layer], self.attention_p) for f in f_real],
                                 [attention_map(f[layer], self.attention_p) for f in f_syn])
        mmd = mean_gap([f[-1] for f in f_real], [f[-1] for f in f_syn])
        loss = self.weight * (sam + self.task_balance * mmd)
        return {"loss": loss, "sam": sam.detach(), "mmd": mmd.detach()}
