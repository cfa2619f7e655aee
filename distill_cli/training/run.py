"""run(cfg): validate → build → fit → evaluate → summarise. One call per run dir."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distill_cli import __version__
from distill_cli.runs import checkpoint
from distill_cli.evaluation.adversarial import pgd_settings, pixel_stats, robust_accuracy
from distill_cli.config.build import (build_data, build_logger, build_model, build_objective, build_optimizer,
                    build_scheduler, model_node, runs_channels_last)
from distill_cli.data import unlabeled
from distill_cli.data.mixing import MIX_OFF, MixSpec
from distill_cli.training.engine import Engine, score
from distill_cli.errors import UserError
from distill_cli.evaluation.privacy import membership_auc
from distill_cli.runs.directory import check_run_dir, check_same_run, resolve_resume
from distill_cli.teachers.outputs import outputs_for_pool, outputs_for_run
from distill_cli.teachers.pool import resolve_pool
from distill_cli.teachers.resolve import check_teachers, resolve_teacher
from distill_cli.reporting.tracking import ConsoleReporter, MetricsFile
from distill_cli.io import read_json, write_json

class RunInterrupted(Exception):
    """Training stopped early (signal or `trainer.stop_at_step`); last.pt is on disk."""

    def __init__(self, exit_code: int, run_dir: Path):
        self.exit_code, self.run_dir = exit_code, run_dir
        super().__init__(f"interrupted; resume with hydra.run.dir={run_dir} trainer.resume=auto")


def validate(cfg: DictConfig) -> None:
    """Cheap checks of values a user types, before anything expensive happens."""
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size",
                "optimizer.lr"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"`{key}` must be a positive number, got {value!r}", key,
                            f"Pass e.g. {key}=" + ("0.05" if key == "optimizer.lr" else "10"))
    if str(cfg.trainer.precision) not in ("32", "bf16"):
        raise UserError(f"trainer.precision={cfg.trainer.precision} is not supported",
                        "trainer.precision", "Use 32 or bf16")
    if cfg.trainer.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"trainer.device={cfg.trainer.device} is not supported",
                        "trainer.device", "Use auto, cpu or cuda")
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available", "trainer.device",
                        "Use trainer.device=auto or cpu")
    if model_node(cfg.student) is None:
        raise UserError("student=none: a run needs a student to train", "student",
                        "Pick an architecture, e.g. student=resnet8")


def mia_settings(cfg: DictConfig, objective) -> dict | None:
    """`membership_auc` keyword arguments when `eval.mia` asks for it (auto: the objective's
    `measures_privacy`), else None."""
    mode = OmegaConf.select(cfg, "eval.mia", default="auto")
    if mode not in ("auto", True, False):
        raise UserError(f"eval.mia={mode} is not an option", "eval.mia", "Use auto, true or false")
    if not (objective.measures_privacy if mode == "auto" else mode):
        return None
    limit = OmegaConf.select(cfg, "eval.mia_max_samples", default=None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"eval.mia_max_samples={limit} must be a positive integer or null",
                        "eval.mia_max_samples", "Use e.g. 10000")
    return {"batch_size": int(cfg.trainer.eval_batch_size), "max_samples": limit,
            "seed": int(cfg.seed)}


def _hydra_context() -> tuple[list[str], str | None]:
    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    group = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    return list(hc.overrides.task), group


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checked_plan(cfg: DictConfig) -> tuple:
    """The objective and every run option that can be refused, checked before anything
    expensive: (objective, mixing, membership-inference settings, label_free, PGD settings)."""
    objective = build_objective(cfg.loss)
    mix = MixSpec.from_config(cfg.augment.mix)
    if mix.enabled and not objective.accepts_soft_targets:
        raise UserError(f"loss={type(objective).__name__} indexes by the hard label, so it "
                        "cannot train on mixup/CutMix batches (their targets are label "
                        "mixtures)", "augment.mix",
                        f"Turn mixing off ({MIX_OFF}) or pick another loss")
    check_teachers(cfg, objective)
    mia = mia_settings(cfg, objective)
    label_free = unlabeled.check(cfg.dataset, objective, mix.enabled, mia is not None)
    pgd = pgd_settings(cfg)   # eval.pgd: validated now, run after training
    return objective, mix, mia, label_free, pgd


def teachers_of(cfg: DictConfig, objective, data, device, printer, tty) -> tuple:
    """(teacher or None, pool [(entry, model, info)] or [], summary info): the one teacher
    (store, checkpoint or online), or a multi-teacher pool whose scores the objective takes."""
    if not objective.multiple_teachers:
        teacher, info = resolve_teacher(cfg, data, device, printer, tty,
                                        online=objective.online_teacher)
        return teacher, [], info
    pool, scores, info = resolve_pool(cfg, data, device, printer, tty)
    objective.set_scores(scores)
    info["teachers/weights"] = objective.teacher_weights.tolist()
    return None, pool, info


def optimizer_and_schedule(opt_node, sched_node, params: list, steps_per_epoch: int,
                           epochs: int) -> tuple:
    optimizer = build_optimizer(opt_node, params)
    return optimizer, build_scheduler(sched_node, optimizer, steps_per_epoch, epochs)


def run(cfg: DictConfig, run_dir: str | Path | None = None, tty: bool | None = None,
        data=None, resume_hint: str | None = None) -> dict:
    """Train one run into `run_dir` (default: Hydra's output dir); `data` reuses a loaded
    DataBundle (the teacher store trains teachers on the student's data); `resume_hint` is
    what an interrupted run tells the user to do (default: the command that resumes it)."""
    started = time.time()
    validate(cfg)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    continuing = check_run_dir(run_dir, cfg.trainer.resume)
    resume_path = resolve_resume(run_dir, cfg.trainer.resume)
    resumed = checkpoint.load(resume_path, "trainer.resume") if resume_path else None
    if resumed is not None:
        check_same_run(cfg, resumed)
    overrides, group = _hydra_context()
    objective, mix, mia, label_free, pgd = checked_plan(cfg)

    device = pick_device(cfg.trainer.device)
    data = data if data is not None else build_data(cfg.dataset).to(device)
    if pgd is not None:
        pixel_stats(data.test, "eval.pgd")   # an attack needs a [0, 1] pixel space
    teacher, pool, teacher_info = teachers_of(cfg, objective, data, device,
                                              ConsoleReporter(0, tty=tty), tty)
    teachers = [model for _, model, _ in pool]
    if label_free:   # after the teacher: a teacher the store trains learns from the labels
        data = unlabeled.student_view(cfg.dataset, data, lambda node: build_data(
            node, "dataset.extra_unlabeled"))
    torch.manual_seed(int(cfg.seed))
    student = build_model(cfg.student, "student", data).to(device)
    # trainable heads (feature methods) are created from the models' shapes, then optimised
    # with the student and saved in checkpoints (`objective`), never in the exported student
    objective.bind(student, teachers or teacher, data)
    objective.to(device)
    if runs_channels_last(cfg, data):
        # NHWC lets oneDNN/cuDNN pick faster conv kernels (measured in benchmarks/); the
        # objective's conv heads see the same NHWC maps
        for model in (student, teacher, *teachers, objective):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    steps_per_epoch = data.train.num_batches(int(cfg.trainer.batch_size), train=True)
    if steps_per_epoch == 0:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the "
                        f"{len(data.train)} training examples", "trainer.batch_size",
                        "Lower trainer.batch_size or raise dataset.limit_train")
    optimizer, scheduler = optimizer_and_schedule(
        cfg.optimizer, cfg.scheduler, list(student.parameters()) + list(objective.parameters()),
        steps_per_epoch, int(cfg.trainer.epochs))
    teacher_optimizer = teacher_scheduler = None
    if objective.online_teacher:   # its own optimizer/scheduler (default: the student's settings)
        teacher_optimizer, teacher_scheduler = optimizer_and_schedule(
            cfg.loss.get("teacher_optimizer", cfg.optimizer),
            cfg.loss.get("teacher_scheduler", cfg.scheduler), list(teacher.parameters()),
            steps_per_epoch, int(cfg.trainer.epochs))

    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = (read_json(run_dir / "summary.json") or {}) if continuing else {}
    logger = build_logger(cfg.logger, run_dir=run_dir, config=resolved,
                          name=str(run_dir), group=group,
                          run_id=resumed.get("wandb_id") if continuing and resumed else None)
    summary = {"status": "running", "seed": int(cfg.seed), "overrides": overrides,
               "git": checkpoint.git_revision(), "run_dir": str(run_dir),
               "dataset": data.name, "student": cfg.student.arch,
               "teacher": cfg.teacher.get("arch"), "loss": cfg.loss._target_.rsplit(".", 1)[-1],
               "wandb_id": logger.run_id, **teacher_info,
               # whether the allocator settings of `distill` (cli.MALLOC_TUNING) are in force
               "malloc_tuned": "MALLOC_MMAP_THRESHOLD_" in os.environ}
    write_json(run_dir / "summary.json", summary)
    reporter = ConsoleReporter(steps_per_epoch * int(cfg.trainer.epochs), tty=tty)
    meta = {"config": resolved, "overrides": overrides,
            "model_config": OmegaConf.to_container(model_node(cfg.student)),
            "data": {"name": data.name, "num_classes": data.num_classes,
                     "input_shape": list(data.input_shape)},
            "git": summary["git"], "code_version": __version__}
    outputs = (outputs_for_pool(pool, objective, data, device, reporter, mix) if pool else
               outputs_for_run(cfg, objective, teacher, teacher_info, data, device, reporter, mix))
    summary.update(outputs.stats() if outputs is not None else
                   {"teacher/outputs": "live"} if teacher is not None or teachers else {})
    engine = Engine(student=student, teacher=teacher, objective=objective, data=data,
                    optimizer=optimizer, scheduler=scheduler, trainer_cfg=cfg.trainer,
                    data_seed=int(cfg.data_seed), device=device, run_dir=run_dir,
                    reporter=reporter, logger=logger, checkpoint_meta=meta, outputs=outputs,
                    outputs_dtype=str(cfg.teacher.outputs_dtype), mix=mix, teachers=teachers,
                    teacher_optimizer=teacher_optimizer, teacher_scheduler=teacher_scheduler)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    exit_code = 1
    try:
        if resumed is not None:
            engine.restore(resumed)
            metrics.truncate_after(engine.state.epoch)
            reporter.stage(f"resumed from {resume_path} at epoch {engine.state.epoch + 1}, "
                           f"step {engine.state.step}")

        def on_epoch_end(row: dict) -> None:
            metrics.append(row)
            logger.log(row, engine.state.step)
            reporter.epoch_end(row)

        status = engine.fit(on_epoch_end)
        wall = previous.get("wall_s", 0.0) + time.time() - started
        summary.update({"epochs": engine.state.epoch, "step": engine.state.step,
                        "best/epoch": engine.state.best_epoch,
                        "best/val/acc1": engine.state.best_acc1,
                        "train/images_per_s": engine.state.images_per_s, "wall_s": wall})
        if status == "interrupted":
            summary["status"] = "interrupted"
            write_json(run_dir / "summary.json", summary)
            signum = engine.stop.signum
            exit_code = 128 + signum if signum else 3
            reporter.stage(f"interrupted at step {engine.state.step}; last.pt written. " + (
                resume_hint or f"Resume: distill {' '.join(overrides)} hydra.run.dir={run_dir} "
                "trainer.resume=auto"))
            raise RunInterrupted(exit_code, run_dir)
        summary.update(final_evaluation(engine, run_dir, mia, pgd))
        if outputs is not None:
            summary.update(outputs.stats())
        summary["status"] = "finished"
        summary["wall_s"] = previous.get("wall_s", 0.0) + time.time() - started
        write_json(run_dir / "summary.json", summary)
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        reporter.summary_table(summary, title=str(run_dir))
        exit_code = 0
        return summary
    except RunInterrupted:
        raise
    except BaseException as exc:
        summary.update({"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]})
        write_json(run_dir / "summary.json", summary)
        raise
    finally:
        logger.finish(exit_code)


def final_evaluation(engine: Engine, run_dir: Path, mia: dict | None = None,
                     pgd: dict | None = None) -> dict:
    """Test accuracy of the best (by val) and last weights, and of the teacher(s) — once (an
    online teacher: its final weights). With `mia` (membership_auc options), membership
    inference of the best weights (`mia/*`) and of the teacher (`teacher/mia/*`). With `pgd`
    (robust_accuracy options, from `eval.pgd`), PGD robust accuracy of both (`*/test/pgd_acc1`)."""
    out = {}
    reference = None
    data = engine.data
    if engine.teacher is not None:
        reference = engine.teacher_eval_logits("test")
        t = score(reference, data.test.targets)
        out.update({f"teacher/test/{k}": v for k, v in t.items() if k != "n"})
        if mia is not None:
            out.update({f"teacher/{k}": v for k, v in membership_auc(
                engine.teacher, data.train, data.test, **mia).items()})
    for i in range(len(engine.teachers)):
        t = score(engine.teacher_eval_logits("test", i), data.test.targets)
        out.update({f"teachers/{i}/test/{k}": v for k, v in t.items() if k != "n"})
    last = engine.evaluate(engine.student, data.test, reference)
    out.update({f"last/test/{k}": v for k, v in last.items() if k != "n"})
    if pgd is not None:
        out["last/test/pgd_acc1"] = robust_accuracy(engine.student, data.test, **pgd)
    best_state = checkpoint.load(run_dir / "checkpoints" / "best.pt", "trainer")["model"]
    current = {k: v.clone() for k, v in engine.student.state_dict().items()}
    engine.student.load_state_dict(best_state)
    best = engine.evaluate(engine.student, data.test, reference)
    if pgd is not None:
        out["best/test/pgd_acc1"] = robust_accuracy(engine.student, data.test, **pgd)
    if mia is not None:
        out.update(membership_auc(engine.student, data.train, data.test, **mia))
    engine.student.load_state_dict(current)
    out.update({f"best/test/{k}": v for k, v in best.items() if k != "n"})
    return out
