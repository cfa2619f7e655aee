"""DC (gradient matching, Zhao, Mopuri & Bilen, ICLR 2021) and DSA (the same with Differentiable
Siamese Augmentation, Zhao & Bilen, ICML 2021): METHODS_FAMILIES.md C1 + C2.

Per synthetic-set update, with the current network θ:
    L = Σ_c D( ∇θ CE(net(A_c(S_c)), c) ,  sg ∇θ CE(net(A_c(B_c)), c) )
S_c: the set's IPC images of class c; B_c: the real batch's images of class c; A_c: identity (DC)
or ONE DSA transform sampled for the class and applied to both (DSA, Siamese); the synthetic
gradient keeps its graph (create_graph) so L back-propagates into the images.
D = 'ours' (layer-wise): Σ_tensors Σ_rows (1 − ⟨g_o, g'_o⟩ / (‖g_o‖‖g'_o‖ + 1e-6)), every tensor
    of rank ≥ 2 viewed as (out, rest) — conv (out, in·h·w), layer-norm-like (C, h·w), linear as
    is — and tensors of rank ≤ 1 (biases, norm γ/β) contributing 0;
    'mse': Σ (g − g')² over all parameters; 'cos': 1 − cosine of all parameters concatenated.

Source: VICO-UoE/DatasetCondensation @53f63a67, main.py:100-225 (the loops), utils.py:218-293
(distance_wb, match_loss, get_loops), utils.py:474-650 (DSA). What we match of the authors' code:
- one authors' ITERATION = `outer_loop` set updates (= engine steps). At its first update a fresh
  random network (seeded from (seed, iteration) here; time-based there); after every update but
  the iteration's last, that network trains `inner_loop` EPOCHS over the detached set (batch 256,
  plain SGD lr_net 0.01, no momentum; DSA per image in DSA mode), in `after_step`, i.e. after the
  images moved, as theirs;
- the loss is the SUM over classes (not averaged), one image-optimizer step per update;
- BatchNorm networks: before each update the network runs 16 real images per class in train
  mode (running statistics, momentum as the module's) and its BN layers are then frozen (eval)
  for the matching; the inner-loop training runs in train mode again (their `epoch()`).
Deviations: the 16 BN images are the first 16 of each class in the step's real batch (itself a
random draw) instead of a separate draw; rank-0 tensors count 0 and rank ≥ 5 tensors are viewed as
(out, rest) (the authors' code has no case for them); every random draw comes from generators
seeded by (seed, step), so a run resumes bit for bit.

State across steps (the network of the current iteration) is saved with the objective's
`state_dict` (`get_extra_state`: plain tensors and numbers). The network is deliberately NOT a
submodule: the engine's optimizer must see only the set's images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_cli.errors import UserError
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.nets import build_net
from distill_cli.tasks.dataset_distill.objective import SetObjective

# utils.py get_loops: IPC → (outer_loop, inner_loop), "empirically good" per the authors.
AUTHORS_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
DISTANCES = ("ours", "mse", "cos")
BN_IMAGES_PER_CLASS = 16   # main.py BNSizePC
EPS = 1e-6                 # utils.py distance_wb / match_loss: added to the PRODUCT of the norms


# ------------------------------------------------------------------ distances
def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor) -> torch.Tensor:
    """'ours' for one parameter tensor: Σ over output rows of (1 − row cosine)."""
    if g_real.dim() <= 1:   # biases, norm scales: the authors return 0 for them
        return g_syn.new_zeros(())
    gs = g_syn.reshape(g_syn.shape[0], -1)
    gr = g_real.reshape(g_real.shape[0], -1)
    dots = (gs * gr).sum(-1)
    return (1 - dots / (gs.norm(dim=-1) * gr.norm(dim=-1) + EPS)).sum()


def gradient_distance(g_syn, g_real, metric: str = "ours") -> torch.Tensor:
    """D(g_syn, g_real) over lists of per-parameter gradients (utils.py match_loss)."""
    if metric == "ours":
        return torch.stack([layer_distance(s, r) for s, r in zip(g_syn, g_real)]).sum()
    vs = torch.cat([s.reshape(-1) for s in g_syn])
    vr = torch.cat([r.reshape(-1) for r in g_real])
    if metric == "mse":
        return ((vs - vr) ** 2).sum()
    if metric == "cos":
        return 1 - (vs * vr).sum() / (vs.norm() * vr.norm() + EPS)
    raise ValueError(f"unknown distance {metric!r}")


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ------------------------------------------------------------------ the objective
class GradientMatching(SetObjective):
    """DC (`dsa_strategy: ""`) and DSA (a DSA strategy); see the module docstring."""

    def __init__(self, net=None, seed: int = 0, distance: str = "ours", outer_loop="auto",
                 inner_loop="auto", lr_net: float = 0.01, batch_train: int = 256,
                 dsa_strategy: str = ""):
        super().__init__()
        if isinstance(net, DictConfig):
            net = OmegaConf.to_container(net, resolve=True)
        self.net_node = dict(net or {"arch": "convnet"})
        self.seed = int(seed)
        if distance not in DISTANCES:
            raise UserError(f"loss.distance={distance!r} is not a gradient distance",
                            "loss.distance", f"Use one of: {', '.join(DISTANCES)} (the "
                            "authors' default: ours)")
        self.distance = distance
        self.outer_cfg = _loop_value(outer_loop, "outer_loop", minimum=1)
        self.inner_cfg = _loop_value(inner_loop, "inner_loop", minimum=0)
        if isinstance(lr_net, bool) or not isinstance(lr_net, (int, float)) or not lr_net > 0:
            raise UserError(f"loss.lr_net={lr_net!r} must be a positive number", "loss.lr_net",
                            "The authors use 0.01")
        self.lr_net = float(lr_net)
        if isinstance(batch_train, bool) or not isinstance(batch_train, int) or batch_train < 1:
            raise UserError(f"loss.batch_train={batch_train!r} must be a positive integer",
                            "loss.batch_train", "The authors use 256")
        self.batch_train = batch_train
        self.dsa_strategy = _check_strategy(dsa_strategy)
        self.outer_loop = self.inner_loop = None   # resolved in bind() from the set's IPC
        self.num_classes = self.in_shape = None
        # the network of the current iteration, kept OUT of the module tree (see docstring)
        self._net: list[nn.Module] = []
        self._net_iteration: int | None = None
        self._pending: dict | None = None   # a loaded state, materialised on first use
        self._set: list[nn.Module] = []     # the synthetic set, for after_step's inner loop

    # .............................................................. setup
    def bind(self, student, teacher, data) -> None:
        self.num_classes, self.in_shape = int(data.num_classes), tuple(data.input_shape)
        ipc = int(student.ipc)
        auto = AUTHORS_LOOPS.get(ipc)
        if auto is None and "auto" in (self.outer_cfg, self.inner_cfg):
            raise UserError(f"loss=dc/dsa: the authors' get_loops defines outer/inner loops "
                            f"only for IPC {sorted(AUTHORS_LOOPS)}, not student.ipc={ipc}",
                            "loss.outer_loop", "Set loss.outer_loop=<set updates per network> "
                            "and loss.inner_loop=<network epochs between them> (e.g. the "
                            "nearest IPC's: " + ", ".join(f"{k}→{v}" for k, v in
                                                         AUTHORS_LOOPS.items()) + ")")
        self.outer_loop = auto[0] if self.outer_cfg == "auto" else self.outer_cfg
        self.inner_loop = auto[1] if self.inner_cfg == "auto" else self.inner_cfg
        self._set = [student]
        if len(self.in_shape) != 3:
            raise UserError(f"loss=dc/dsa matches the gradients of an image network, but the "
                            f"dataset's inputs have shape {self.in_shape}", "dataset",
                            "Use an image dataset (C, H, W): digits, mnist, cifar10, ...")
        self._build_net(0, torch.device("cpu"))   # a bad net node fails now, not at step 0

    def _build_net(self, iteration: int, device) -> nn.Module:
        net = build_net(self.net_node, self.in_shape, self.num_classes,
                        seed=derive_seed("dc-net", self.seed, iteration))
        return net.to(device)

    def _network(self, iteration: int, update: int, device) -> nn.Module:
        """The iteration's network: fresh at its first update, else the one carried over (or
        restored from a checkpoint)."""
        if update == 0:
            self._net, self._net_iteration, self._pending = \
                [self._build_net(iteration, device)], iteration, None
        elif self._pending is not None:
            self._restore(self._pending, iteration, device)
        if not self._net or self._net_iteration != iteration:
            # a checkpoint taken between iterations holds no network; a run resumed from it
            # with another outer_loop lands inside an iteration whose network never existed
            raise UserError(f"Resuming at set update {update} of iteration {iteration}, but "
                            "the checkpoint holds no network for it (was the run started "
                            "with another loss.outer_loop?)", "loss.outer_loop",
                            "Resume with the outer_loop the run was started with")
        return self._net[0]

    # .............................................................. one update
    def step_terms(self, student, teacher, batch, ctx):
        self._set = [student]
        iteration, update = divmod(ctx.step, self.outer_loop)
        net = self._network(iteration, update, student.images.device)
        params = list(net.parameters())
        net.train()
        if has_batchnorm(net):
            self._freeze_batchnorm(net, batch)
        loss = student.images.new_zeros(())
        for c in range(self.num_classes):
            real = batch.x[batch.y == c]
            if len(real) == 0:   # no real image of c (cannot happen with the task's batches)
                continue
            syn = student.class_images(c)
            if self.dsa_strategy:
                real, syn = self.siamese(real, syn, ctx.step, c)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), _labels(real, c)), params)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), _labels(syn, c)), params,
                                        create_graph=True)
            loss = loss + gradient_distance(g_syn, g_real, self.distance)
        return {"loss": loss}

    def siamese(self, real: torch.Tensor, syn: torch.Tensor, step: int, c: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE DSA transform for class c at this step, applied to the real and the synthetic
        images alike (the authors share a seed; we share the sampled parameters)."""
        g = torch.Generator().manual_seed(derive_seed("dc-dsa", self.seed, step, c))
        params = dsa.sample(self.dsa_strategy, 1, g, real.shape[-2], real.shape[-1])
        return dsa.apply(real, params), dsa.apply(syn, params)

    @staticmethod
    def _freeze_batchnorm(net: nn.Module, batch) -> None:
        """main.py:163-174: running statistics from 16 real images per class, then frozen."""
        ys = batch.y
        rows = torch.cat([torch.nonzero(ys == c).flatten()[:BN_IMAGES_PER_CLASS]
                          for c in torch.unique(ys)])
        with torch.no_grad():
            net(batch.x[rows])
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    # .............................................................. the inner loop
    def after_step(self, terms, ctx) -> None:
        update = ctx.step % self.outer_loop
        if update == self.outer_loop - 1:   # the iteration's last update: its net is done
            self._net, self._net_iteration = [], None
            return
        net, student = self._net[0], self._set[0]
        images = student.images.detach().clone()
        labels = student.labels
        # the images' backward left second-order gradients on the net's parameters
        opt = torch.optim.SGD(net.parameters(), lr=self.lr_net)   # stateless (no momentum)
        opt.zero_grad(set_to_none=True)
        if self.inner_loop == 0:
            return
        g = torch.Generator().manual_seed(derive_seed("dc-inner", self.seed, ctx.step))
        net.train()
        for _ in range(self.inner_loop):
            order = torch.randperm(len(images), generator=g).to(images.device)
            for start in range(0, len(images), self.batch_train):
                idx = order[start:start + self.batch_train]
                x = images[idx]
                if self.dsa_strategy:
                    x = dsa.augment(x, self.dsa_strategy, g)
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)

    # .............................................................. exact resume
    def get_extra_state(self) -> dict:
        if self._pending is not None:   # loaded but not used yet: pass it on unchanged
            return self._pending
        if not self._net:
            return {}
        return {"iteration": int(self._net_iteration), "outer_loop": int(self.outer_loop),
                "net": {k: v.detach().clone() for k, v in self._net[0].state_dict().items()}}

    def set_extra_state(self, state) -> None:
        # bind() may not have run yet (and the device is unknown): restore on first use
        self._net, self._net_iteration = [], None
        self._pending = dict(state) if state else None

    def _restore(self, state: dict, iteration: int, device) -> None:
        saved_iteration, saved_outer = int(state["iteration"]), int(state["outer_loop"])
        if saved_outer != self.outer_loop or saved_iteration != iteration:
            raise UserError(f"The checkpoint holds the matching network of iteration "
                            f"{saved_iteration} with loss.outer_loop={saved_outer}, but this "
                            f"run resumes inside iteration {iteration} with "
                            f"loss.outer_loop={self.outer_loop}", "loss.outer_loop",
                            "Resume with the outer_loop the run was started with")
        net = self._build_net(saved_iteration, device)
        try:
            net.load_state_dict(state["net"])
        except RuntimeError as exc:
            raise UserError(f"The checkpoint's matching network does not fit task.net "
                            f"({self.net_node}): {str(exc).splitlines()[0]}", "task.net",
                            "Resume with the network the run was started with (task.net)"
                            ) from None
        self._net, self._net_iteration, self._pending = [net], saved_iteration, None


def _labels(x: torch.Tensor, c: int) -> torch.Tensor:
    return torch.full((len(x),), c, dtype=torch.long, device=x.device)


def _loop_value(value, name: str, minimum: int):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"loss.{name}={value!r} must be auto or an integer >= {minimum}",
                        f"loss.{name}", "auto takes the authors' get_loops value for the "
                        "set's IPC (1→(1,1), 10→(10,50), 20→(20,25), 30→(30,20), 40→(40,15), "
                        "50→(50,10))")
    return value


def _check_strategy(strategy) -> str:
    """'' / 'none' / None → no augmentation (DC); otherwise a DSA strategy string, whose
    families are checked now (a user error naming loss.dsa_strategy), not at the first step."""
    if not isinstance(strategy, (str, type(None))):
        raise UserError(f"loss.dsa_strategy={strategy!r} is not a strategy string",
                        "loss.dsa_strategy", f"Use e.g. {dsa.STRATEGY_DEFAULT}, or '' for none")
    return "_".join(dsa.families(strategy, key="loss.dsa_strategy"))
