"""Resolve the teacher: none, a checkpoint, or the teacher store (trained once, then reused) —
or, for online objectives (BD-KD), a fresh teacher that trains with the student.

Whatever the source, the architecture and class count are checked against the dataset before
the student's training starts, and a non-online teacher comes back frozen: eval mode, no
gradients, never in the optimizer.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_cli.runs import checkpoint
from distill_cli.config.build import TEACHER_SOURCE_KEYS, build_model, model_node
from distill_cli.seeding import derive_seed
from distill_cli.errors import UserError
from distill_cli.models.fold import fold_batchnorm
from distill_cli.runs.directory import LAST, check_same_run
from distill_cli.teachers.store import Store, content_key
from distill_cli.io import read_json

STORE_FORMAT = 1  # bump when the meaning of a stored teacher changes


def check_compatible(ckpt: dict, arch: DictConfig, data, key: str,
                     any_classes: bool = False) -> None:
    """The checkpoint must hold this architecture, trained for this dataset's classes/inputs
    (`any_classes`: another class count is fine — a teacher from another task)."""
    saved_arch = ckpt["model_config"].get("arch")
    if saved_arch != arch.arch:
        raise UserError(f"The checkpoint holds a `{saved_arch}` but teacher={arch.arch} was asked "
                        "for", "teacher", f"Set teacher={saved_arch}, or point "
                        f"`{key}` at a {arch.arch} checkpoint")
    saved = ckpt.get("data", {})
    if saved.get("num_classes") != data.num_classes and not any_classes:
        raise UserError(f"The teacher checkpoint was trained for {saved.get('num_classes')} "
                        f"classes ({saved.get('name')}) but dataset {data.name} has "
                        f"{data.num_classes}", key,
                        "Use a teacher trained on the same dataset (or drop "
                        "teacher.checkpoint to let the teacher store train one)")
    if list(saved.get("input_shape", []))[:1] != list(data.input_shape)[:1]:
        raise UserError(f"The teacher expects {saved.get('input_shape')} inputs but dataset "
                        f"{data.name} gives {list(data.input_shape)}", key,
                        "Use a teacher trained on the same kind of input")


def frozen_from_checkpoint(node: DictConfig, ckpt: dict, data, device, key: str,
                           any_classes: bool = False) -> nn.Module:
    """The checkpoint's model, frozen. With `any_classes` it keeps the class count it was trained
    for (its head may not predict this dataset's classes)."""
    arch = model_node(node)
    check_compatible(ckpt, arch, data, key, any_classes)
    if any_classes:
        data = SimpleNamespace(num_classes=ckpt["data"]["num_classes"],
                               input_shape=data.input_shape)
    model = build_model(node, "teacher", data)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"The teacher checkpoint does not fit teacher={arch.arch} with these "
                        f"options ({str(exc).splitlines()[0][:160]})", "teacher",
                        "Use the same architecture options the teacher was trained with "
                        f"(saved: {ckpt['model_config']})") from None
    return model.to(device).eval().requires_grad_(False)


def pretrained(arch: DictConfig, data, device) -> nn.Module:
    """A torchvision teacher with published weights (e.g. ImageNet ResNet-34): used as is, so
    its classes must be the dataset's — a re-initialised head would make it no teacher."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch.name)[arch.weights]
    except (KeyError, ValueError) as exc:
        raise UserError(f"No weights {arch.weights!r} for torchvision model {arch.name!r} "
                        f"({exc})", "teacher.weights",
                        "Use a name from torchvision's weights enum, e.g. IMAGENET1K_V1") from None
    classes = len(weights.meta.get("categories") or [])
    if classes != data.num_classes:
        raise UserError(f"teacher.weights={arch.weights} predicts {classes} classes but dataset "
                        f"{data.name} has {data.num_classes}", "teacher.weights",
                        "Drop teacher.weights to let the teacher store train a teacher on this "
                        "dataset, or pass teacher.checkpoint")
    model = build_model(arch, "teacher", data)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------ teacher store
def teacher_description(cfg: DictConfig, data) -> dict:
    """Everything that determines a stored teacher — and nothing else (not the student, loss,
    run seed or paths), so every run of a sweep that shares these shares the teacher."""
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    train = teacher["train"]
    return {"format": STORE_FORMAT,
            "model": {k: v for k, v in teacher.items() if k not in TEACHER_SOURCE_KEYS},
            "data": data.identity, "seed": int(teacher["seed"]),
            "train": {**{k: train[k] for k in ("epochs", "batch_size", "optimizer", "scheduler",
                                               "loss")},
                      # NHWC trains with other kernels (other last bits); named only when on,
                      # so the keys of every NCHW-trained teacher stay what they were
                      **({"channels_last": True} if train.get("channels_last") else {})},
            "precision": str(cfg.trainer.precision)}


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """The config of the run that trains the teacher: the teacher becomes the student."""
    c = OmegaConf.to_container(cfg, resolve=True)
    teacher, train = c["teacher"], c["teacher"]["train"]
    c["student"] = {k: v for k, v in teacher.items() if k not in TEACHER_SOURCE_KEYS}
    c["teacher"] = {**{k: teacher[k] for k in TEACHER_SOURCE_KEYS if k in teacher},
                    "_target_": None, "arch": None, "checkpoint": None}
    # data order and augmentation follow the teacher's seed too: with the student's `data_seed`
    # the stored teacher would depend on which job of a sweep happened to build it
    c.update(loss=train["loss"], optimizer=train["optimizer"], scheduler=train["scheduler"],
             seed=teacher["seed"], data_seed=teacher["seed"],
             logger={"_target_": "distill_cli.reporting.tracking.NullLogger", "_partial_": True},
             teachers=[], self_distill={**c.get("self_distill", {}), "generations": 0})
    # the student's memory format is a speed choice of ITS run; the teacher's is teacher.train's.
    # Gradient clipping is part of the student's recipe, which never reaches the teacher.
    c["trainer"].update(epochs=train["epochs"], batch_size=train["batch_size"], resume=None,
                        stop_at_step=None, checkpoint_every_n_steps=None, grad_clip=None,
                        channels_last=bool(train.get("channels_last", False)))
    c["augment"] = {"mix": {}}  # the student's mixing is a distillation choice, not the teacher's
    # likewise label-free student training (data/unlabeled.py): a teacher learns from the labels
    c["dataset"].update(labels=True, extra_unlabeled=None)
    return OmegaConf.create(c)


def from_store(cfg: DictConfig, data, device, reporter, tty) -> tuple[nn.Module, dict]:
    desc = teacher_description(cfg, data)
    key = content_key(desc)
    store = Store(cfg.store.root, "teachers")
    meta = store.get(key)
    hit = meta is not None
    if not hit:
        waiting = f"teacher {cfg.teacher.arch}: another job is training it (key {key}); waiting"
        with store.lock(key, on_wait=lambda: reporter.stage(waiting)):
            meta = store.get(key)  # another job may have trained it while we waited
            hit = meta is not None
            if not hit:
                meta = _train_into_store(cfg, data, store, key, desc, reporter, tty)
    if hit:
        reporter.stage(f"teacher {cfg.teacher.arch}: reusing stored teacher {key} "
                       f"(test acc1 {meta['test_acc1']:.2f}, trained {meta['created']})")
    ckpt = checkpoint.load(store.path(key) / "checkpoints" / "best.pt", "teacher")
    model = frozen_from_checkpoint(cfg.teacher, ckpt, data, device, "teacher")
    return model, {"teacher/key": key, "teacher/source": "store", "teacher/store_hit": hit,
                   "teacher/store_dir": str(store.path(key))}


def _train_into_store(cfg, data, store: Store, key: str, desc: dict, reporter, tty) -> dict:
    """Train the teacher `key` in its build dir and publish it. A build that stopped early
    (Ctrl-C, SIGTERM, a crash after an epoch) is continued from its last.pt, exactly."""
    from distill_cli.training.run import run  # the same runner trains the teacher

    staging = store.staging(key)
    run_dir = staging / "run"
    # a finished run whose publication did not happen (the files may be half moved): publish
    summary = read_json(run_dir / "summary.json") or read_json(staging / "summary.json") or {}
    if summary.get("status") != "finished":
        tcfg = teacher_run_config(cfg)
        tcfg.trainer.resume = _continue_build(tcfg, staging, key, reporter)
        if tcfg.trainer.resume is None:
            reporter.stage(f"teacher {cfg.teacher.arch}: not in the store — training it first "
                           f"({cfg.teacher.train.epochs} epochs, key {key}, in {staging})")
        hint = ("Run the same command again: the teacher build continues from this checkpoint "
                f"({run_dir / LAST}); `distill-teachers prune` discards it")
        try:
            summary = run(tcfg, run_dir, tty=tty, data=data, resume_hint=hint)
        except BaseException as exc:  # an interrupted run always leaves its last.pt
            if not (run_dir / LAST).is_file():  # nothing worth continuing
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, UserError):
                raise _in_teacher_terms(exc) from None
            raise
    for name in ("checkpoints", "summary.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            (run_dir / name).rename(staging / name)
    shutil.rmtree(run_dir, ignore_errors=True)  # whatever else a run leaves is not the entry
    meta = {"arch": desc["model"]["arch"], "model": desc["model"], "dataset": data.name,
            "description": desc, "test_acc1": summary["best/test/acc1"],
            "val_acc1": summary["best/val/acc1"], "wall_s": summary["wall_s"],
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "git": summary["git"]}
    return store.publish(key, staging, meta)


# where teacher_run_config took the teacher run's keys from: the keys the user can change
_TEACHER_KEYS = {"optimizer.": "teacher.train.optimizer.", "scheduler.": "teacher.train.scheduler.",
                 "loss.": "teacher.train.loss.", "trainer.epochs": "teacher.train.epochs",
                 "trainer.batch_size": "teacher.train.batch_size"}


def _in_teacher_terms(err: UserError) -> UserError:
    """The teacher run's error about e.g. `optimizer.lr`, told as the user's
    `teacher.train.optimizer.lr`."""
    for theirs, ours in _TEACHER_KEYS.items():
        if (err.key or "").startswith(theirs):
            key = ours + err.key[len(theirs):]
            return UserError(err.what.replace(err.key, key), key, err.fix.replace(err.key, key))
    return err


def _continue_build(tcfg: DictConfig, staging: Path, key: str, reporter) -> str | None:
    """Return "auto" when `staging` holds an unfinished build of this very run to continue;
    else None, with `staging` emptied (a build that stopped before its first checkpoint, or one
    whose settings outside the key differ: continuing it would mix two recipes)."""
    last = staging / "run" / LAST
    if last.is_file():
        try:
            ckpt = checkpoint.load(last, "teacher store")
            check_same_run(tcfg, ckpt)
        except UserError as err:
            reporter.stage(f"teacher {tcfg.student.arch}: its unfinished build cannot be "
                           f"continued ({err.what}); starting over")
        else:
            state = ckpt["state"]
            reporter.stage(f"teacher {tcfg.student.arch}: continuing its unfinished build "
                           f"(key {key}) at epoch {state['epoch'] + 1}, step {state['step']}")
            return "auto"
    shutil.rmtree(staging)
    staging.mkdir()
    return None


def check_teachers(cfg: DictConfig, objective) -> None:
    """The teacher setup the objective needs: one teacher, a pool (`teachers`), or none."""
    name = type(objective).__name__
    pool = list(OmegaConf.select(cfg, "teachers", default=[]) or [])
    if objective.multiple_teachers:
        if model_node(cfg.teacher) is not None:
            raise UserError(f"loss={name} distils from the `teachers` pool, but teacher="
                            f"{cfg.teacher.arch} was also given", "teacher",
                            "Use teacher=none and list the teachers in `teachers`")
        if not pool:
            raise UserError(f"loss={name} needs a pool of teachers but `teachers` is empty",
                            "teachers", "Pass e.g. 'teachers=[{arch: resnet8, checkpoint: "
                            "<run>/checkpoints/best.pt}, {arch: resnet8, seed: 1}]'")
        return
    if pool:
        raise UserError(f"`teachers` is set but loss={name} distils from one teacher", "teachers",
                        "Use loss=multi_teacher, or drop `teachers` and set `teacher`")
    if objective.needs_teacher and model_node(cfg.teacher) is None:
        if objective.online_teacher:
            raise UserError(f"loss={name} trains a teacher alongside the student but teacher=none",
                            "teacher", "Name the teacher's architecture, e.g. teacher=resnet20 "
                            "(it starts from scratch; no checkpoint)")
        raise UserError(f"loss={name} distils from a teacher but "
                        "teacher=none", "teacher",
                        "Name a teacher and its weights (teacher=resnet20 "
                        "teacher.checkpoint=<run>/checkpoints/best.pt), or use loss=ce")


def online_teacher(cfg: DictConfig, data, device) -> tuple[nn.Module, dict]:
    """A freshly initialised teacher that trains with the student (BD-KD): no store, no
    checkpoint. Its init seed is derived from `teacher.seed` (not equal to it), so a teacher and
    student of the same architecture never start as the same network."""
    node = cfg.teacher
    if node.get("checkpoint") or model_node(node).get("weights"):
        raise UserError(f"loss={cfg.loss._target_.rsplit('.', 1)[-1]} trains its teacher from "
                        "scratch with the student, so it takes no teacher weights",
                        "teacher.checkpoint" if node.get("checkpoint") else "teacher.weights",
                        "Drop teacher.checkpoint / teacher.weights (teacher.seed sets the "
                        "online teacher's initialisation)")
    torch.manual_seed(derive_seed("online-teacher", int(node.seed)))
    model = build_model(node, "teacher", data).to(device).train()
    return model, {"teacher/source": "online", "teacher/seed": int(node.seed)}


def resolve_teacher(cfg: DictConfig, data, device: torch.device, reporter=None, tty=None, *,
                    online: bool = False, any_classes: bool = False
                    ) -> tuple[nn.Module | None, dict]:
    """Return (teacher or None, summary fields describing where it came from). The teacher is
    frozen, except with `online` (a fresh, trainable one); `any_classes` accepts a checkpoint
    trained for another class count (a source teacher of the multi-teacher pool)."""
    node = cfg.teacher
    arch = model_node(node)
    if arch is None:
        if node.get("checkpoint"):
            raise UserError("`teacher.checkpoint` is set but teacher=none", "teacher",
                            "Also name the teacher architecture, e.g. teacher=resnet20")
        return None, {}
    if online:
        return online_teacher(cfg, data, device)
    if not node.get("checkpoint") and arch.get("weights"):
        model, info = pretrained(arch, data, device), {"teacher/source": f"weights:{arch.weights}"}
    elif not node.get("checkpoint"):
        model, info = from_store(cfg, data, device, reporter, tty)
    else:
        ckpt = checkpoint.load(node.checkpoint, "teacher.checkpoint")
        model = frozen_from_checkpoint(node, ckpt, data, device, "teacher.checkpoint",
                                       any_classes)
        info = {"teacher/source": "checkpoint",
                "teacher/checkpoint": str(Path(node.checkpoint).expanduser())}
    # a frozen teacher is an inference-only graph: BN folded into its convs (models/fold.py)
    return model, {**info, "teacher/bn_folded": fold_batchnorm(model)}


# ------------------------------------------------------------------------------ store commands
def list_stored(root: str | Path):
    """A rich table of complete entries (newest last) and the count of unfinished builds."""
    from rich.table import Table

    store = Store(root, "teachers")
    table = Table(title=f"teacher store: {store.dir}")
    for col in ("key", "arch", "dataset", "test acc1", "epochs", "seed", "size", "created"):
        table.add_column(col, justify="right" if col in ("test acc1", "size") else "left")
    entries = sorted(store.entries(), key=lambda m: m.get("created", ""))
    for m in entries:
        desc = m.get("description", {})
        table.add_row(m["key"], m["arch"], m["dataset"], f"{m['test_acc1']:.2f}",
                      str(desc.get("train", {}).get("epochs", "")), str(desc.get("seed", "")),
                      f"{m['size_bytes'] / 2**20:.1f} MiB", m["created"])
    return table, entries, store.leftovers()


def prune_stored(root: str | Path, keys: list[str], everything: bool) -> list[str]:
    """Remove unfinished builds always; plus the named entries, or all with `everything`."""
    store = Store(root, "teachers")
    removed = []
    for path in store.leftovers():
        key = path.name.split("-")[1] if path.name.startswith(".tmp-") else path.name
        with store.lock(key):  # never delete a build that is running right now
            if path.exists():
                import shutil
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    known = {m["key"] for m in store.entries()}
    for key in sorted(known if everything else set(keys)):
        if key not in known:
            raise UserError(f"No stored teacher with key {key}", "key",
                            "Run `distill-teachers list` to see the keys")
        store.remove(key)
        removed.append(key)
    return removed
