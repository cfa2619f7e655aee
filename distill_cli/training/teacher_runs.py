"""How the runner trains a teacher for the teacher store: the teacher's run config (the teacher
becomes the student of a run with `teacher.train`'s recipe), and the `StoreAccess` the store
receives — so teachers/ never imports the runner."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill_cli.config.build import TEACHER_SOURCE_KEYS
from distill_cli.errors import UserError
from distill_cli.runs.directory import check_same_run
from distill_cli.teachers.build import StoreAccess
from distill_cli.training.distributed import SINGLE


def teacher_run_config(cfg: DictConfig, node: DictConfig | None = None) -> DictConfig:
    """The config of the run that trains the teacher `node` (default: `cfg.teacher`): the
    teacher becomes the student."""
    c = OmegaConf.to_container(cfg, resolve=True)
    if node is not None:
        c["teacher"] = OmegaConf.to_container(node, resolve=True)
    teacher, train = c["teacher"], c["teacher"]["train"]
    c["student"] = {k: v for k, v in teacher.items() if k not in TEACHER_SOURCE_KEYS}
    # (a node of a task's own stored model, the diffusion task's classifier, has no outputs keys)
    c["teacher"] = {"outputs": "auto", "outputs_dtype": "float32",
                    **{k: teacher[k] for k in TEACHER_SOURCE_KEYS if k in teacher},
                    "_target_": None, "arch": None, "checkpoint": None}
    # data order and augmentation follow the teacher's seed too: with the student's `data_seed`
    # the stored teacher would depend on which job of a sweep happened to build it
    # a task whose teachers are another task's models (dataset distillation: classifiers) names it
    # and a model a task needs from the store names its own (`train.task`: a classifier for FD)
    c["task"] = train.get("task") or c["task"].get("teacher_task") or c["task"]
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




# where teacher_run_config took the teacher run's keys from: the keys the user can change
_TEACHER_KEYS = {"optimizer.": "teacher.train.optimizer.", "scheduler.": "teacher.train.scheduler.",
                 "loss.": "teacher.train.loss.", "trainer.epochs": "teacher.train.epochs",
                 "trainer.batch_size": "teacher.train.batch_size",
                 "student": "teacher"}   # the teacher run's student IS the user's teacher


def _in_teacher_terms(err: UserError) -> UserError:
    """The teacher run's error about e.g. `optimizer.lr`, told as the user's
    `teacher.train.optimizer.lr`. A diverged teacher build (training/run.py RunDiverged, which
    carries the step) is told without the student run's "continue this run dir" advice: the
    build's dir is the store's staging dir, not the user's."""
    if getattr(err, "step", None) is not None:
        what = err.what.split(". The run stopped")[0]
        return UserError(f"The teacher store's training of the teacher failed — {what}",
                         "teacher.train.optimizer.lr", "Lower teacher.train.optimizer.lr; "
                         "`distill-teachers prune` removes the unfinished build")
    for theirs, ours in _TEACHER_KEYS.items():
        if (err.key or "").startswith(theirs):
            key = ours + err.key[len(theirs):]
            return UserError(err.what.replace(err.key, key), key, err.fix.replace(err.key, key))
    return err


def store_access(cfg: DictConfig, data, tty, run) -> StoreAccess:
    """The store's view of this run: its root and precision, and `run` (training/run.py,
    passed in) training a teacher on this run's loaded data."""

    def train(node: DictConfig, run_dir: Path, resume: bool, hint: str) -> dict:
        tcfg = teacher_run_config(cfg, node)
        tcfg.trainer.resume = "auto" if resume else None
        try:
            # one process: under torchrun only the rank holding the store's lock trains it
            return run(tcfg, run_dir, tty=tty, data=data, resume_hint=hint, world=SINGLE)
        except UserError as err:
            raise _in_teacher_terms(err) from None

    def same_run(node: DictConfig, ckpt: dict) -> None:
        check_same_run(teacher_run_config(cfg, node), ckpt)

    return StoreAccess(root=str(cfg.store.root), precision=str(cfg.trainer.precision),
                       train=train, same_run=same_run)
