"""The teacher store's builder: a teacher is trained once, by the runner's own training function
(injected by the caller, so this floor never imports the runner), and published atomically.

The key (`teacher_description`) covers everything that determines the teacher and nothing
else: a sweep over students, losses, seeds or the student's learning rate shares one teacher.
A build stopped after its first checkpoint is continued bit-exactly by the next run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_cli import keys
from distill_cli.config.build import TEACHER_SOURCE_KEYS
from distill_cli.errors import UserError
from distill_cli.io import read_json
from distill_cli.runs import checkpoint
from distill_cli.runs.directory import LAST, check_same_run
from distill_cli.teachers.load import frozen_from_checkpoint
from distill_cli.teachers.store import Store, content_key

#: train(cfg, run_dir, tty=, data=, resume_hint=) -> summary: the runner (training/run.py)
TrainFn = Callable[..., dict]

STORE_FORMAT = 1  # bump when the meaning of a stored teacher changes


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


def from_store(cfg: DictConfig, data, device, reporter, tty, train: TrainFn
               ) -> tuple[nn.Module, dict]:
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
                meta = _train_into_store(cfg, data, store, key, desc, reporter, tty, train)
    if hit:
        reporter.stage(f"teacher {cfg.teacher.arch}: reusing stored teacher {key} "
                       f"(test acc1 {meta['test_acc1']:.2f}, trained {meta['created']})")
    ckpt = checkpoint.load(store.path(key) / "checkpoints" / "best.pt", "teacher")
    model = frozen_from_checkpoint(cfg.teacher, ckpt, data, device, "teacher")
    return model, {keys.TEACHER_KEY: key, keys.TEACHER_SOURCE: "store",
                   keys.TEACHER_STORE_HIT: hit, keys.TEACHER_STORE_DIR: str(store.path(key))}


def _train_into_store(cfg, data, store: Store, key: str, desc: dict, reporter, tty,
                      train: TrainFn) -> dict:
    """Train the teacher `key` in its build dir and publish it. A build that stopped early
    (Ctrl-C, SIGTERM, a crash after an epoch) is continued from its last.pt, exactly."""
    staging = store.staging(key)
    run_dir = staging / "run"
    # a finished run whose publication did not happen (the files may be half moved): publish
    summary = read_json(run_dir / "summary.json") or read_json(staging / "summary.json") or {}
    if summary.get(keys.STATUS) != "finished":
        tcfg = teacher_run_config(cfg)
        tcfg.trainer.resume = _continue_build(tcfg, staging, key, reporter)
        if tcfg.trainer.resume is None:
            reporter.stage(f"teacher {cfg.teacher.arch}: not in the store — training it first "
                           f"({cfg.teacher.train.epochs} epochs, key {key}, in {staging})")
        hint = ("Run the same command again: the teacher build continues from this checkpoint "
                f"({run_dir / LAST}); `distill-teachers prune` discards it")
        try:
            summary = train(tcfg, run_dir, tty=tty, data=data, resume_hint=hint)
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
            "description": desc, "test_acc1": summary[keys.BEST_TEST_ACC1],
            "val_acc1": summary[keys.BEST_VAL_ACC1], "wall_s": summary[keys.WALL_S],
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "git": summary[keys.GIT]}
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
