"""MTT's expert trajectories, trained once and stored like teachers (METHODS_FAMILIES C4).

An expert is the matching network (`net`, ConvNet-3) trained on the FULL real training split
from its own seed; its trajectory is the flat parameter vector (`nets.flat_params` order) after
init and after every epoch: one float32 tensor `[epochs + 1, P]` per expert.

Source: GeorgeCazenavette/mtt-distillation@50dccea4 buffer.py — what we match: SGD lr
`lr_teacher` 0.01, momentum 0, wd 0 (`--mom 0 --l2 0`), batch 256 over a shuffled loader that
keeps the last partial batch, DSA per image (`DiffAugment(img, dsa_strategy)` with seed -1 in
utils.py `epoch`, `--dsa True` is the default), parameters kept after init and after every epoch
(`timestamps`), no lr decay (`--decay` off). Theirs: 100 experts x 50 epochs; ours: `experts.num`
and `experts.epochs` (the YAML). Randomness differs only in its source: the network's init is
`derive_seed("mtt-expert", i, experts.seed)` (`build_net`, global RNG untouched), the data order
and the DSA draws come from generators seeded from (experts.seed, i, epoch), so an expert is a
pure function of its recipe and is rebuilt bit for bit.

FTD (Du et al., CVPR 2023, AngusDujw/FTD-distillation@711532a0 buffer/buffer_FTD.py,
buffer/gsam/gsam.py, utils/utils_gsam.py `epoch`): flat trajectories come from training the
EXPERTS with GSAM (`experts.sam_rho` > 0; their run_buffer.sh uses rho 0.01, `--alpha` 0.4,
`--adaptive` True, rho constant as their lr is). Each batch: g = ∇L(w); e = ρ·g/‖g‖ (adaptive:
e = ρ·w²⊙g/‖|w|⊙g‖); g_p = ∇L(w + e) on the same augmented batch; the update direction is
g_p − α·(g − cos(g, g_p)·‖g‖·g_p/‖g_p‖) (GSAM's decomposition), applied by the base SGD at w.

Store layout (the teacher store's, teachers/store.py, so its listing shows these entries too):
`<store_root>/experts/<key>/` holds `expert_<i>.pt` and `entry.json` (written last, then the
staging directory `.tmp-<key>` is renamed into place); `<key>.lock` (a flock, released by the
kernel if its holder dies) makes concurrent runs wait instead of training the same experts twice.
A build killed midway leaves only `.tmp-<key>` whose finished experts (each written atomically)
the next build keeps. We do not import teachers/store.py: it lives a floor above tasks/.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import nn

from distill_cli.data.augment import normalize
from distill_cli.data.bundle import DATA_VERSION
from distill_cli.errors import UserError
from distill_cli.io import atomic_write_bytes, blocking_file, read_json, write_json
from distill_cli.runs import provenance
from distill_cli.seeding import derive_seed
from distill_cli.tasks.dataset_distill import dsa
from distill_cli.tasks.dataset_distill.nets import build_net, flat_params

FORMAT = 1             # bump when a change here alters the trajectories a recipe yields
KIND = "experts"
ENTRY_FILE = "entry.json"
PREFIX = "loss.experts"


def content_key(payload: dict) -> str:
    """16 hex digits of the SHA-256 of a JSON description (key order does not matter) — the
    teacher store's `content_key`, restated here (a floor below it)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _number(name: str, value, *, minimum: float, integer: bool, strict: bool = False):
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value) \
        and (value > minimum if strict else value >= minimum)
    if not ok:
        what = "an integer" if integer else "a finite number"
        rel = ">" if strict else ">="
        raise UserError(f"{PREFIX}.{name}={value!r} must be {what} {rel} {minimum:g}",
                        f"{PREFIX}.{name}", f"Give {what} {rel} {minimum:g}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class ExpertRecipe:
    """How the experts train (all of it is in the key). Defaults: the authors' buffer.py, but
    5 experts instead of 100 and `sam_rho` 0 (plain MTT; FTD's experts: 0.01)."""

    num: int = 5
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    dsa_strategy: str = dsa.STRATEGY_DEFAULT
    seed: int = 0
    sam_rho: float = 0.0
    sam_alpha: float = 0.4
    sam_adaptive: bool = True

    @classmethod
    def from_node(cls, node) -> ExpertRecipe:
        if node is None:
            node = {}
        if not hasattr(node, "keys"):
            raise UserError(f"{PREFIX}={node!r} is not a mapping of the expert recipe", PREFIX,
                            "Give e.g. loss.experts.num=5 loss.experts.epochs=20")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise UserError(f"{PREFIX} has no setting {unknown[0]!r}", f"{PREFIX}.{unknown[0]}",
                            f"Use some of: {', '.join(sorted(known))}")
        v = {**asdict(cls()), **dict(node)}
        strategy = "" if v["dsa_strategy"] is None else v["dsa_strategy"]
        if not isinstance(strategy, str):
            raise UserError(f"{PREFIX}.dsa_strategy={strategy!r} is not a strategy string",
                            f"{PREFIX}.dsa_strategy", f"Use e.g. {dsa.STRATEGY_DEFAULT} or none")
        dsa.families(strategy, f"{PREFIX}.dsa_strategy")   # unknown names: refused now
        if not isinstance(v["sam_adaptive"], bool):
            raise UserError(f"{PREFIX}.sam_adaptive={v['sam_adaptive']!r} must be true or false",
                            f"{PREFIX}.sam_adaptive", "Give true or false")
        return cls(num=_number("num", v["num"], minimum=1, integer=True),
                   epochs=_number("epochs", v["epochs"], minimum=1, integer=True),
                   lr=_number("lr", v["lr"], minimum=0, integer=False, strict=True),
                   momentum=_number("momentum", v["momentum"], minimum=0, integer=False),
                   weight_decay=_number("weight_decay", v["weight_decay"], minimum=0,
                                        integer=False),
                   batch_size=_number("batch_size", v["batch_size"], minimum=1, integer=True),
                   dsa_strategy=strategy,
                   seed=_number("seed", v["seed"], minimum=-(2 ** 63), integer=True),
                   sam_rho=_number("sam_rho", v["sam_rho"], minimum=0, integer=False),
                   sam_alpha=_number("sam_alpha", v["sam_alpha"], minimum=0, integer=False),
                   sam_adaptive=v["sam_adaptive"])

    def key_part(self) -> dict:
        """The recipe as it enters the key: GSAM's alpha/adaptive only when SAM is on, so
        changing them without SAM does not train the experts again."""
        part = asdict(self)
        if self.sam_rho == 0:
            del part["sam_alpha"], part["sam_adaptive"]
        return part


def description(data, net: dict, recipe: ExpertRecipe) -> dict:
    """Everything that determines the trajectories, and nothing else: the data as the teacher
    store keys it (`data.identity`: dataset, split and limit settings), the network node, the
    recipe and its seeds."""
    return {"format": FORMAT, "data_version": DATA_VERSION, "data": data.identity,
            "net": dict(net), "recipe": recipe.key_part()}


# ----------------------------------------------------------------------------- training

def _gsam_step(net: nn.Module, params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor],
               opt: torch.optim.Optimizer, recipe: ExpertRecipe, eps: float = 1e-12) -> None:
    """One GSAM update (FTD's gsam.py `step`, its `perturb_weights`, `gradient_decompose`)."""
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    live = [p for p in params if p.grad is not None]
    with torch.no_grad():
        g = [p.grad.clone() for p in live]
        if recipe.sam_adaptive:   # their weight_adaptive norm: ‖|w| ⊙ g‖
            norm = torch.stack([(p.abs() * gi).norm() for p, gi in zip(live, g)]).norm()
        else:
            norm = torch.stack([gi.norm() for gi in g]).norm()
        scale = recipe.sam_rho / (norm + eps)
        e = [gi * scale * (p.pow(2) if recipe.sam_adaptive else 1.0) for p, gi in zip(live, g)]
        for p, ei in zip(live, e):
            p.add_(ei)
    # BN running statistics must not see the perturbed pass twice (their disable_running_stats)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    for m, mom in zip(bns, saved):
        m.momentum = mom
    with torch.no_grad():
        gp = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        inner = sum((gi * gpi).sum() for gi, gpi in zip(g, gp))
        new_norm = torch.stack([gpi.norm() for gpi in gp]).norm()
        old_norm = torch.stack([gi.norm() for gi in g]).norm()
        cosine = inner / (new_norm * old_norm + eps)
        for p, gi, gpi, ei in zip(live, g, gp, e):
            vertical = gi - cosine * old_norm * gpi / (new_norm + eps)
            if p.grad is None:
                p.grad = gpi
            p.grad.add_(vertical, alpha=-recipe.sam_alpha)
            p.sub_(ei)   # back to w: the base step applies the direction at w
    opt.step()


def _images(split, name: str):
    x = getattr(split, "x", None)
    if x is None or x.dim() != 4:
        raise UserError(f"MTT trains its experts on images held in memory; the {name} split "
                        "of this dataset is not", "dataset",
                        "Use an in-memory image dataset (digits, mnist, fashion_mnist, cifar10)")
    return x


def train_expert(data, net_node: dict, recipe: ExpertRecipe, index: int, device
                 ) -> tuple[torch.Tensor, float]:
    """Expert `index`'s trajectory `[epochs + 1, P]` (float32, CPU) and the test acc1 (%) of
    its final weights."""
    split = data.train
    x_all, y_all = _images(split, "training"), split.targets
    in_shape = tuple(int(s) for s in data.input_shape)
    net = build_net(net_node, in_shape, data.num_classes,
                    seed=derive_seed("mtt-expert", index, recipe.seed)).to(device)
    net.train()
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    rows = [flat_params(net).detach().float().cpu()]
    n = len(split)
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed("mtt-expert-order", recipe.seed, index, epoch)))
        aug = torch.Generator().manual_seed(derive_seed("mtt-expert-dsa", recipe.seed, index,
                                                         epoch))
        for start in range(0, n, recipe.batch_size):   # keeps the last partial batch
            idx = order[start:start + recipe.batch_size].to(x_all.device)
            x = normalize(x_all.index_select(0, idx), split._mean, split._std).to(device)
            y = y_all.index_select(0, idx).to(device)
            x = dsa.augment(x, recipe.dsa_strategy, aug)   # per image: non-Siamese

            def loss_fn(x=x, y=y):
                return F.cross_entropy(net(x), y)

            if recipe.sam_rho > 0:
                _gsam_step(net, params, loss_fn, opt, recipe)
            else:
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()
        rows.append(flat_params(net).detach().float().cpu())
    return torch.stack(rows), test_accuracy(net, data.test, device)


@torch.no_grad()
def test_accuracy(net: nn.Module, split, device) -> float:
    """Test acc1 (%) of the trained network (eval mode, as the authors' `epoch("test")`) — the
    check that an expert learned. Measured on the live network: the trajectory holds parameters
    only, not a batch-norm net's running statistics."""
    net.eval()
    correct = total = 0
    for batch in split.eval_batches(512):
        pred = net(batch.x.to(device)).argmax(1)
        correct += int((pred == batch.y.to(device)).sum())
        total += int(batch.y.numel())
    return 100.0 * correct / max(total, 1)


# ----------------------------------------------------------------------------- the store

@dataclass
class Experts:
    key: str
    path: Path
    trajectories: list[torch.Tensor]   # per expert [epochs + 1, P], float32, CPU
    meta: dict
    trained: bool                      # False: reused from the store


def _store_dir(root) -> Path:
    root_dir = Path(str(root)).expanduser()
    fix = "Point loss.store_root (store.root) at a directory (or a path where one can be created)"
    if blocking_file(root_dir / KIND / "entry") is not None:
        raise UserError(f"The store root {root} is not a directory", "loss.store_root", fix)
    try:
        (root_dir / KIND).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the store directory {root_dir / KIND} "
                        f"({type(exc).__name__}: {exc.strerror or exc})", "loss.store_root",
                        fix) from None
    return root_dir / KIND


def _broken(path: Path, why: str) -> UserError:
    return UserError(f"The stored expert trajectories {path} are broken ({why})",
                     "loss.store_root",
                     f"Remove the directory {path}; the next run trains the experts again")


def _check_entry(path: Path, key: str, recipe: ExpertRecipe) -> dict | None:
    """The entry's metadata, None when there is no complete entry; raises when it is broken."""
    if not (path / ENTRY_FILE).is_file():
        return None
    meta = read_json(path / ENTRY_FILE)
    if not isinstance(meta, dict):
        raise _broken(path, "entry.json is empty or not JSON")
    if meta.get("key") != key or meta.get("num") != recipe.num \
            or meta.get("epochs") != recipe.epochs:
        raise _broken(path, "entry.json does not describe this key's experts")
    return meta


def _read(file: Path) -> tuple[object, str | None]:
    """(the file's content, None) or (None, why it cannot be read)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True), None
    except Exception as exc:  # noqa: BLE001 - a damaged file raises IndexError, KeyError, ...
        return None, f"{file.name} cannot be read ({type(exc).__name__})"


def _load(path: Path, recipe: ExpertRecipe, params: int) -> list[torch.Tensor]:
    out = []
    for i in range(recipe.num):
        file = path / f"expert_{i}.pt"
        traj, why = _read(file)
        if why:
            raise _broken(path, why)
        if not isinstance(traj, torch.Tensor) or traj.dtype != torch.float32 \
                or tuple(traj.shape) != (recipe.epochs + 1, params):
            raise _broken(path, f"{file.name} is not a [{recipe.epochs + 1}, {params}] float32 "
                                "trajectory")
        out.append(traj)
    return out


def _save(file: Path, traj: torch.Tensor) -> None:
    atomic_write_bytes(file, lambda fh: torch.save(traj.contiguous(), fh))


def build_experts(root, data, net_node: dict, recipe: ExpertRecipe, device="cpu",
                  log: Callable[[str], None] = print) -> Experts:
    """The experts of (data, net, recipe): loaded from `<root>/experts/<key>/`, trained into it
    first when absent (one `log` line per expert)."""
    in_shape = tuple(int(s) for s in data.input_shape)
    if len(in_shape) != 3:
        raise UserError(f"MTT matches trajectories of an image network, but the dataset's "
                        f"inputs have shape {in_shape}", "dataset",
                        "Use an image dataset (C, H, W): digits, mnist, cifar10, ...")
    # a bad net node fails here, before anything is trained or written
    params = flat_params(build_net(net_node, in_shape, data.num_classes, seed=0)).numel()
    desc = description(data, net_node, recipe)
    key = content_key(desc)
    kind_dir = _store_dir(root)
    path = kind_dir / key
    meta = _check_entry(path, key, recipe)
    trained = False
    if meta is None:
        lock = FileLock(str(kind_dir / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"experts {key}: another job is training them; waiting")
            lock.acquire()
        try:
            meta = _check_entry(path, key, recipe)   # trained while we waited?
            if meta is None:
                meta = _train_into(kind_dir, key, desc, data, net_node, recipe, device, params,
                                   log)
                trained = True
        finally:
            lock.release()
    if not trained:
        log(f"experts {key}: reusing {recipe.num} stored trajectories "
            f"(test acc1 {_mean(meta.get('test_acc1')):.2f} mean"
            f"{provenance.trained_elsewhere(meta.get('machine'), device)})")
    return Experts(key, path, _load(path, recipe, params), meta, trained)


def _mean(values) -> float:
    try:
        return sum(values) / len(values)
    except (TypeError, ZeroDivisionError):
        return float("nan")


def _kept(file: Path, score: Path, recipe: ExpertRecipe, params: int) -> float | None:
    """The test acc1 of an expert an interrupted build finished (its .pt and then its .json
    written atomically), or None to train it."""
    acc = (read_json(score) or {}).get("test_acc1") if score.is_file() else None
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not file.is_file():
        return None
    traj, _ = _read(file)   # an unreadable leftover: train it again
    ok = isinstance(traj, torch.Tensor) and traj.dtype == torch.float32 \
        and tuple(traj.shape) == (recipe.epochs + 1, params)
    return float(acc) if ok else None


def _train_into(kind_dir: Path, key: str, desc: dict, data, net_node: dict,
                recipe: ExpertRecipe, device, params: int, log) -> dict:
    """Train every expert into the staging dir `.tmp-<key>` (keeping finished ones of a killed
    build), then publish it as `<key>/`. Called with the key's lock held."""
    staging = kind_dir / f".tmp-{key}"
    staging.mkdir(exist_ok=True)
    accs = []
    for i in range(recipe.num):
        file, score = staging / f"expert_{i}.pt", staging / f"expert_{i}.json"
        started = time.perf_counter()
        acc = _kept(file, score, recipe, params)
        kept = acc is not None
        if not kept:
            traj, acc = train_expert(data, net_node, recipe, i, device)
            _save(file, traj)
            write_json(score, {"test_acc1": acc})   # after the trajectory: marks it finished
        accs.append(acc)
        log(f"expert {i + 1}/{recipe.num} ({key}): {recipe.epochs} epochs, test acc1 {acc:.2f}"
            + (" (kept from an interrupted build)" if kept
               else f" ({time.perf_counter() - started:.1f}s)"))
    meta = {"what": "MTT expert trajectories: per expert a float32 [epochs+1, P] tensor of the "
                    "network's flat parameters after init and after every epoch",
            "key": key, "num": recipe.num, "epochs": recipe.epochs, "params": params,
            "test_acc1": accs, "description": desc,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": provenance.machine_kind(device)}
    write_json(staging / ENTRY_FILE, meta)
    final = kind_dir / key
    if final.exists():   # a leftover without entry.json
        shutil.rmtree(final)
    os.replace(staging, final)
    return meta
