"""MTT — Matching Training Trajectories (Cazenavette et al., CVPR 2022), METHODS_FAMILIES.md C4.

    θ̂₀ = θ*_e,   θ̂_{n+1} = θ̂_n − α ∇_θ CE(f(DSA(x_n); θ̂_n), y_n),   n = 0..N−1
    L = ‖θ̂_N − θ*_{e+M}‖² / ‖θ*_e − θ*_{e+M}‖²

θ* an expert trajectory (experts.py: the network trained on the real data, parameters after
every epoch), e ~ U{0..T⁺−1} (max_start_epoch), M = expert_epochs, N = syn_steps, (x_n, y_n)
chunks of a fresh random permutation of the synthetic set (batch_syn; default all of it), DSA
per image (non-Siamese), α the set's learnable step size (`syn_lr`, init lr_teacher, optimised
at lr_lr in its own group). The unroll keeps the whole graph (create_graph=True), so L reaches
both the images and α.

Source: GeorgeCazenavette/mtt-distillation@50dccea4 distill.py:294-396 — what we match: a
random expert and `start_epoch = randint(0, max_start_epoch)` (:306, :324); starting and target
parameters flattened (:325-332); per synthetic step a chunk popped from `torch.split(randperm,
batch_syn)` refilled when empty (:344-348); `DiffAugment(x, dsa_strategy)` with seed -1 (:359);
the flat-parameter forward of a ReparamModule (:365, ours: `nets.functional_forward`);
`grad(ce, θ, create_graph=True)` and `θ − syn_lr·grad` (:368-370); the loss as the ratio of the
two `mse_loss(reduction="sum")` (:376-386; the /num_params factors cancel); `syn_lr` init
lr_teacher, SGD lr_lr momentum 0.5 (:118, :139; the momentum is the run optimizer's, the
recipe's 0.5). Ours differs in where randomness comes from: the expert, the start epoch, the
permutations and the DSA draws all come from one generator seeded `derive_seed("mtt", seed,
step)` (theirs: global numpy/torch RNG and a shuffled file order), so an update is a pure
function of (seed, step, set) and resume is exact with nothing carried across steps. The experts
are 5 by default (theirs 100) and trained in-process by `bind()` when the store lacks them.
The authors never clamp α; a run whose α reaches <= 0 stops here with a user error naming
`loss.lr_lr` (`after_step`) instead of unrolling uphill and failing in the evaluation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.experts import ExpertRecipe, build_experts
from distill_cli.tasks.dataset_distill.nets import build_net, functional_forward
from distill_cli.tasks.dataset_distill.objective import SetObjective


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"loss.{name}={value!r} must be an integer >= {minimum}",
                        f"loss.{name}", f"Give a whole number >= {minimum}")
    return int(value)


def _positive(name: str, value, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        rel = ">= 0" if allow_zero else "> 0"
        raise UserError(f"loss.{name}={value!r} must be a finite number {rel}",
                        f"loss.{name}", f"Give a number {rel}")
    return float(value)


def normalized_distance(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor
                        ) -> torch.Tensor:
    """‖end − target‖² / ‖start − target‖² over flat parameter vectors (the expert's own
    displacement normalises, not the student's)."""
    return (end - target).pow(2).sum() / (start - target).pow(2).sum()


def unroll(net, theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
           lr: torch.Tensor, steps: int, batch_syn: int | None, strategy: str,
           generator: torch.Generator) -> torch.Tensor:
    """θ̂_N: `steps` differentiable SGD steps from `theta0` on chunks of the synthetic set, each
    chunk augmented per image; the graph reaches `images`, `lr` and `theta0`."""
    theta = theta0
    chunks: list[torch.Tensor] = []
    n = len(images)
    for _ in range(steps):
        if not chunks:   # a fresh permutation, consumed chunk by chunk from its end as theirs
            chunks = list(torch.randperm(n, generator=generator).split(batch_syn or n))
        idx = chunks.pop().to(images.device)
        x = dsa.augment(images.index_select(0, idx), strategy, generator)
        ce = F.cross_entropy(functional_forward(net, theta, x), labels.index_select(0, idx))
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta = theta - lr * grad
    return theta


class TrajectoryMatching(SetObjective):
    """MTT (module docstring). Terms: `loss`, `syn_lr` (α, detached)."""

    method = "mtt"

    def __init__(self, net=None, seed: int = 0, store_root=None, experts=None,
                 expert_epochs: int = 3, syn_steps: int = 20, max_start_epoch: int = 25,
                 batch_syn: int | None = None, lr_teacher: float = 0.01, lr_lr: float = 1e-5,
                 dsa_strategy: str = dsa.STRATEGY_DEFAULT):
        super().__init__()
        if net is None or not hasattr(net, "get"):
            raise UserError(f"loss=mtt needs the network node, got {net!r}", "loss.net",
                            "Set loss.net=${task.net} (the method's YAML does)")
        if store_root is None or not str(store_root).strip():
            raise UserError("loss=mtt stores its expert trajectories, but loss.store_root is "
                            "empty", "loss.store_root",
                            "Set loss.store_root=${store.root} (the method's YAML does)")
        if dsa_strategy is None:
            dsa_strategy = ""
        if not isinstance(dsa_strategy, str):
            raise UserError(f"loss.dsa_strategy={dsa_strategy!r} is not a strategy string",
                            "loss.dsa_strategy", f"Use e.g. {dsa.STRATEGY_DEFAULT} or none")
        dsa.families(dsa_strategy, "loss.dsa_strategy")   # unknown names: refused now
        self.net = dict(net)
        self.seed = int(seed)
        self.store_root = str(store_root)
        self.recipe = ExpertRecipe.from_node(experts)
        self.expert_epochs = _integer("expert_epochs", expert_epochs, 1)
        self.syn_steps = _integer("syn_steps", syn_steps, 1)
        self.max_start_epoch = _integer("max_start_epoch", max_start_epoch, 1)
        self.batch_syn = None if batch_syn is None else _integer("batch_syn", batch_syn, 1)
        self.lr_teacher = _positive("lr_teacher", lr_teacher)
        self.lr_lr = _positive("lr_lr", lr_lr, allow_zero=True)
        self.dsa_strategy = dsa_strategy
        last = self.max_start_epoch + self.expert_epochs
        if last > self.recipe.epochs:
            raise UserError(
                f"loss.max_start_epoch={self.max_start_epoch} + loss.expert_epochs="
                f"{self.expert_epochs} = {last} reaches past the experts' last epoch "
                f"(loss.experts.epochs={self.recipe.epochs})", "loss.max_start_epoch",
                f"Use loss.max_start_epoch <= {max(self.recipe.epochs - self.expert_epochs, 0)} "
                "(or train longer experts: loss.experts.epochs)")
        # kept out of the module tree: not parameters, not in checkpoints (the store has them)
        self._nets: list = []
        self._student: list = []   # the bound set, for after_step (a list: not a submodule)
        self._trajectories: list[torch.Tensor] = []
        self.experts_key: str | None = None

    def bind(self, student, teacher, data) -> None:
        if not hasattr(student, "enable_learnable_lr"):
            raise UserError("loss=mtt trains a synthetic set", "student",
                            "Use task=dataset_distill student=synthetic")
        in_shape = tuple(int(s) for s in data.input_shape)
        if len(in_shape) != 3:
            raise UserError(f"loss=mtt matches trajectories of an image network, but the "
                            f"dataset's inputs have shape {in_shape}", "dataset",
                            "Use an image dataset (C, H, W): digits, mnist, cifar10, ...")
        device = student.images.device
        experts = build_experts(self.store_root, data, self.net, self.recipe, device=device)
        self.experts_key = experts.key
        self._trajectories = experts.trajectories
        # the architecture the flat vectors are unflattened into; its own values are unused
        self._nets = [build_net(self.net, in_shape, data.num_classes, seed=0).to(device)]
        self._nets[0].train()   # the authors' student_net.train()
        student.enable_learnable_lr(init=self.lr_teacher, lr=self.lr_lr)
        self._student = [student]

    def step_terms(self, student, teacher, batch, ctx):
        g = torch.Generator().manual_seed(derive_seed("mtt", self.seed, ctx.step))
        expert = int(torch.randint(len(self._trajectories), (1,), generator=g))
        start_epoch = int(torch.randint(self.max_start_epoch, (1,), generator=g))
        traj = self._trajectories[expert]
        images, labels = student.images, student.labels
        start = traj[start_epoch].to(images.device)
        target = traj[start_epoch + self.expert_epochs].to(images.device)
        net = self._nets[0].to(images.device)
        end = unroll(net, start.clone().requires_grad_(True), images, labels, student.lr,
                     self.syn_steps, self.batch_syn, self.dsa_strategy, g)
        loss = normalized_distance(end, start, target)
        return {"loss": loss, "syn_lr": student.lr.detach().clone()}

    def after_step(self, terms, ctx) -> None:
        """Stop, naming the setting, when the optimizer has pushed α to <= 0 (the authors do
        not clamp it): the unroll would then climb the loss, and the evaluation networks that
        train at the learned step size could not train at all."""
        lr = self._student[0].lr if self._student else None
        if lr is not None and not float(lr.detach()) > 0:
            raise UserError(
                f"MTT's learnable step size syn_lr became {float(lr.detach()):.4g} at step "
                f"{ctx.step} (it must stay > 0): loss.lr_lr={self.lr_lr:g} moves it too fast "
                "for this loss", "loss.lr_lr",
                "Use a smaller loss.lr_lr (the authors: 1e-5, 1e-7 at IPC 1) or a smaller "
                "optimizer.lr")
