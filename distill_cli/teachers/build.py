"""The teacher store's builder: a teacher is trained once, by the runner's own training function
(injected by the caller, so this floor never imports the runner), and published atomically.

The key (`teacher_description`) covers everything that determines the teacher and nothing
else: a sweep over students, losses, seeds or the student's learning rate shares one teacher.
A build stopped after its first checkpoint is continued bit-exactly by the next run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill_cli import keys
from distill_cli.config.build import TEACHER_SOURCE_KEYS
from distill_cli.errors import UserError
from distill_cli.io import read_json, sha256_file, write_json
from distill_cli.runs import checkpoint, provenance
from distill_cli.runs.directory import LAST
from distill_cli.tasks.classification.evaluate import predict
from distill_cli.teachers.load import frozen_from_checkpoint
from distill_cli.teachers.store import BrokenEntry, Store, content_key, prune_command



@dataclass(frozen=True)
class StoreAccess:
    """What the teacher store needs from the run that asks for a teacher (built by
    training/teacher_runs.py, so this floor never imports the runner)."""

    root: str        # `store.root`
    precision: str   # `trainer.precision`: part of a teacher's key
    # train(teacher node, run dir, resume, hint) -> summary: the runner trains the teacher as
    # its student; resume continues an unfinished build; hint is what an interruption tells
    train: Callable[[DictConfig, Path, bool, str], dict]
    # same_run(teacher node, last.pt) raises UserError when the checkpoint is not this very
    # teacher's run (settings outside the key differ)
    same_run: Callable[[DictConfig, dict], None]

STORE_FORMAT = 1  # bump when the meaning of a stored teacher changes


def teacher_description(node: DictConfig, data, precision: str) -> dict:
    """Everything that determines a stored teacher (`node` is the teacher node) — and nothing
    else (not the student, loss, run seed or paths), so every run of a sweep that shares these
    shares the teacher."""
    teacher = OmegaConf.to_container(node, resolve=True)
    train = teacher["train"]
    return {"format": STORE_FORMAT,
            "model": {k: v for k, v in teacher.items() if k not in TEACHER_SOURCE_KEYS},
            "data": data.identity, "seed": int(teacher["seed"]),
            "train": {**{k: train[k] for k in ("epochs", "batch_size", "optimizer", "scheduler",
                                               "loss")},
                      # NHWC trains with other kernels (other last bits); named only when on,
                      # so the keys of every NCHW-trained teacher stay what they were
                      **({"channels_last": True} if train.get("channels_last") else {}),
                      # a model that another task trains (tasks/base.py stored_models)
                      **({"task": train["task"]} if train.get("task") else {})},
            "precision": str(precision)}


def from_store(node: DictConfig, data, device, reporter, access: StoreAccess,
               role: str = "teacher") -> tuple[nn.Module, dict]:
    """The teacher `node` describes, from the store — trained first when it is not there.
    `role` names it in messages (a task's own stored model: "feature_net")."""
    desc = teacher_description(node, data, access.precision)
    key = content_key(desc)
    store = Store(access.root, "teachers")
    meta = _entry(store, key)
    hit = meta is not None
    if not hit:
        waiting = f"{role} {node.arch}: another job is training it (key {key}); waiting"
        with store.lock(key, on_wait=lambda: reporter.stage(waiting)):
            meta = _entry(store, key)  # another job may have trained it while we waited
            hit = meta is not None
            if not hit:
                meta = _train_into_store(node, data, store, key, desc, reporter, access, role)
    if hit:
        reporter.stage(f"{role} {node.arch}: reusing stored teacher {key} "
                       f"({score_text(meta)}, trained {meta['created']}"
                       f"{provenance.trained_elsewhere(meta.get('machine'), device)})")
    best = store.path(key) / "checkpoints" / "best.pt"
    fix = (f"The stored teacher is damaged: remove it with `{prune_command(access.root, key)}` "
           "and run again (the store trains it anew)")
    try:
        ckpt = checkpoint.load(best, "teacher", fix=fix)
        model = frozen_from_checkpoint(node, ckpt, data, device, "teacher")
    except UserError as err:   # the entry's own files, not the user's settings, are wrong
        raise UserError(f"Stored teacher {key}: {err.what}", "teacher", fix) from None
    if hit:
        verify_stored(model, best, meta, data, device, access.precision, fix)
    else:   # just scored by its own run's final evaluation: nothing to check on first reuse
        _record_verified(best, meta.get("test_acc1"))
    return model, {keys.TEACHER_KEY: key, keys.TEACHER_SOURCE: "store",
                   keys.TEACHER_STORE_HIT: hit, keys.TEACHER_STORE_DIR: str(store.path(key))}


def _entry(store: Store, key: str) -> dict | None:
    try:
        return store.get(key)
    except BrokenEntry as err:   # the run asked for it through `teacher`
        raise UserError(err.what, "teacher", err.fix) from None


VERIFIED_FILE = "verified.json"   # in the entry: best.pt's hash, once it scored its record


def verify_stored(model: nn.Module, best: Path, meta: dict, data, device, precision: str,
                  fix: str) -> None:
    """A stored teacher must still score what its entry records on the test split (a damaged
    or NaN best.pt would otherwise teach at chance level). Checked once per best.pt content:
    the pass is recorded next to it by hash, and hashing costs far less than a test pass."""
    digest = sha256_file(best)
    marker = best.parent.parent / VERIFIED_FILE
    recorded = (read_json(marker) or {}).get("best_sha256")
    if recorded == digest:
        return
    if meta.get("test_acc1") is None:   # not a classifier: its weights are checked by hash
        if recorded is not None:
            raise UserError(f"Stored teacher {meta['key']}: its weights ({best}) are not the ones "
                            "that were stored (their SHA-256 changed)", "teacher", fix)
        _record_verified(best, None, digest)
        return
    logits, targets = predict(model, data.test, 512, device, precision)
    n = len(targets)
    if n == 0 or logits.dim() != 2:   # the record is a classifier's test acc1
        return
    acc = float((logits.argmax(1).cpu() == targets.cpu()).double().mean()) * 100
    # precision/memory-format differences may flip a sample or two, never the accuracy
    tol = max(1.0, 200.0 / n)
    if not abs(acc - float(meta["test_acc1"])) <= tol:   # also catches a NaN accuracy
        raise UserError(f"Stored teacher {meta['key']} scores {acc:.2f} test acc1 but its entry "
                        f"records {meta['test_acc1']:.2f}: its weights ({best}) are not the "
                        "ones that were stored", "teacher", fix)
    _record_verified(best, acc, digest)


def _record_verified(best: Path, acc: float | None, digest: str | None = None) -> None:
    try:
        write_json(best.parent.parent / VERIFIED_FILE, {
            "best_sha256": digest or sha256_file(best), "test_acc1": acc,
            "checked": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError:   # a read-only store is still usable: the check runs again next time
        pass




def _train_into_store(node: DictConfig, data, store: Store, key: str, desc: dict, reporter,
                      access: StoreAccess, role: str = "teacher") -> dict:
    """Train the teacher `key` in its build dir and publish it. A build that stopped early
    (Ctrl-C, SIGTERM, a crash after an epoch) is continued from its last.pt, exactly."""
    staging = store.staging(key)
    run_dir = staging / "run"
    # a finished run whose publication did not happen (the files may be half moved): publish
    summary = read_json(run_dir / "summary.json") or read_json(staging / "summary.json") or {}
    summary = summary if isinstance(summary, dict) else {}   # a mangled file: not finished
    if summary.get(keys.STATUS) != "finished":
        resume = _continue_build(node, staging, key, reporter, access, role)
        if not resume:
            reporter.stage(f"{role} {node.arch}: not in the store — training it first "
                           f"({node.train.epochs} epochs, key {key}, in {staging})")
        hint = ("Run the same command again: the teacher build continues from this checkpoint "
                f"({run_dir / LAST}); `distill-teachers prune` discards it")
        try:
            summary = access.train(node, run_dir, resume, hint)
        except BaseException:  # an interrupted run always leaves its last.pt
            if not (run_dir / LAST).is_file():  # nothing worth continuing
                shutil.rmtree(staging, ignore_errors=True)
            raise
    for name in ("checkpoints", "summary.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            (run_dir / name).rename(staging / name)
    shutil.rmtree(run_dir, ignore_errors=True)  # whatever else a run leaves is not the entry
    meta = {"arch": desc["model"]["arch"], "model": desc["model"], "dataset": data.name,
            "description": desc, **test_record(summary),
            "val_acc1": summary.get(keys.BEST_VAL_ACC1), "wall_s": summary[keys.WALL_S],
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "git": summary[keys.GIT],
            "machine": summary.get(keys.MACHINE)}
    return store.publish(key, staging, meta)


def test_record(summary: dict) -> dict:
    """What a stored entry records of its run's test score: `test_acc1` for a classifier, and
    for any task its selection metric (`score_name`: -FD for a generator, -NLL for an LM)."""
    metric = summary.get(keys.SELECTION_METRIC, "acc1")
    out = {"score_name": metric, "test_score": summary[keys.join(keys.BEST_TEST, metric)]}
    if keys.BEST_TEST_ACC1 in summary:
        out["test_acc1"] = summary[keys.BEST_TEST_ACC1]
    return out


def score_text(meta: dict) -> str:
    """An entry's test score for a message or a table ("test acc1 89.83")."""
    if "test_score" not in meta:   # entries written before `test_score`
        return f"test acc1 {meta['test_acc1']:.2f}"
    return f"test {meta.get('score_name', 'acc1')} {meta['test_score']:.4g}"


def _continue_build(node: DictConfig, staging: Path, key: str, reporter,
                    access: StoreAccess, role: str = "teacher") -> bool:
    """True when `staging` holds an unfinished build of this very run to continue; else False,
    with `staging` emptied (a build that stopped before its first checkpoint, or one
    whose settings outside the key differ: continuing it would mix two recipes)."""
    last = staging / "run" / LAST
    if last.is_file():
        try:
            ckpt = checkpoint.load(last, "teacher store", resume=True)
            access.same_run(node, ckpt)
        except UserError as err:
            reporter.stage(f"{role} {node.arch}: its unfinished build cannot be "
                           f"continued ({err.what}); starting over")
        else:
            state = ckpt["state"]
            reporter.stage(f"{role} {node.arch}: continuing its unfinished build "
                           f"(key {key}) at epoch {state['epoch'] + 1}, step {state['step']}")
            return True
    shutil.rmtree(staging)
    staging.mkdir()
    return False
