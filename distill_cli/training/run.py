"""run(cfg): check → build → fit → evaluate → summarise. One call per run dir.

The composed config is read here, at the top; the floors below receive objects and typed
settings: the task, the objective, the teacher topology, `TrainerSettings`.

A run holds its run dir's lock (runs/directory.py) from before it decides whether it may write
there until its last write, so two launches into one dir never both run. How a run ends:
finished (exit 0), interrupted (`RunInterrupted`: 3, or 128 + the signal), diverged
(`RunDiverged`: 4, trainer.on_nonfinite), refused (`UserError`: 2), crashed (1, status failed).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from distill_cli import __version__, keys
from distill_cli.config.build import build_data, build_logger, model_node
from distill_cli.models.memory_format import channels_last_for
from distill_cli.data import unlabeled
from distill_cli.errors import UserError
from distill_cli.evaluation.adversarial import pixel_stats, robust_accuracy
from distill_cli.evaluation.privacy import membership_auc
from distill_cli.io import atomic_write_bytes, read_json, remove_stale_tmp, write_json
from distill_cli.reporting.tracking import ConsoleReporter, MetricsFile, NullLogger, SilentReporter
from distill_cli.runs import allocator, checkpoint, provenance
from distill_cli.runs.directory import (RunFinished, check_run_dir, check_same_run,
                                        resolve_resume, run_dir_lock)
from distill_cli.training.engine import Diverged, Engine, RunSinks
from distill_cli.training.distributed import World, init_world
from distill_cli.training.plan import checked_plan, pick_device, validate
from distill_cli.training.settings import TrainerSettings
from distill_cli.teachers.resolve import resolve_teacher
from distill_cli.training.teacher_runs import store_access
from distill_cli.training.threads import apply_thread_budget
from distill_cli.training.teacher_setup import (choose_topology, optimizer_and_schedule,
                                                teacher_models)


class RunInterrupted(Exception):
    """Training stopped early (signal or `trainer.stop_at_step`); last.pt is on disk."""

    def __init__(self, exit_code: int, run_dir: Path):
        self.exit_code, self.run_dir = exit_code, run_dir
        super().__init__(f"interrupted; resume with hydra.run.dir={run_dir} trainer.resume=auto")


class RunDiverged(UserError):
    """The loss or the weights became non-finite (trainer.on_nonfinite): the run stopped with
    status `diverged`; one paragraph, exit code 4 — it ran, unlike a refused launch (2)."""

    exit_code = 4

    def __init__(self, diverged: Diverged, run_dir: Path, policy: str):
        self.step, self.epoch = diverged.step, diverged.epoch
        continue_it = f"hydra.run.dir={run_dir} trainer.resume=auto"
        fix = ("Start a new run with a smaller optimizer.lr (or with trainer.grad_clip)"
               + ("" if policy == "skip" else ", or continue this one from its last checkpoint "
                  f"skipping such steps: {continue_it} trainer.on_nonfinite=skip"))
        super().__init__(f"Training diverged: {diverged.what} at step {diverged.step} (epoch "
                         f"{diverged.epoch}). The run stopped: {run_dir / 'summary.json'} says "
                         "status diverged, and no checkpoint was written from that step on",
                         "optimizer.lr", fix)


def _hydra_context() -> tuple[list[str], str | None]:
    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    group = str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    return list(hc.overrides.task), group


def run(cfg: DictConfig, run_dir: str | Path | None = None, tty: bool | None = None,
        data=None, resume_hint: str | None = None, world: World | None = None) -> dict:
    """Train one run into `run_dir` (default: Hydra's output dir); `data` reuses a loaded
    DataBundle (the teacher store trains teachers on the student's data); `resume_hint` is
    what an interrupted run tells the user to do (default: the command that resumes it);
    `world`: the data-parallel ranks (default: torchrun's, else one process)."""
    started = time.time()
    world = world or init_world()
    validate(cfg)
    threads = apply_thread_budget(cfg.trainer.get("threads", "auto"))
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    with run_dir_lock(run_dir, hold=world.is_main):   # rank 0 writes the dir: it holds it
        return _run_in(cfg, run_dir, tty, data, resume_hint, world, started, threads)


def _run_in(cfg: DictConfig, run_dir: Path, tty, data, resume_hint, world: World,
            started: float, threads: int) -> dict:
    """`run` once this launch holds `run_dir`."""
    continuing = claim_run_dir(run_dir, cfg.trainer.resume, world)
    if isinstance(continuing, dict):   # trainer.resume=if_any on a finished run: its summary
        if world.is_main:
            ConsoleReporter(0, tty=tty).stage(f"{run_dir} already finished (trainer.resume=if_any)")
        return continuing
    # resume=auto|if_any found a run that stopped before its first checkpoint: it starts over
    restarting = not continuing and cfg.trainer.resume is not None and (
        run_dir / "summary.json").exists()
    if world.is_main:   # what writers killed mid-write left (the lock says none is alive here)
        for folder in (run_dir, run_dir / "checkpoints"):
            remove_stale_tmp(folder)
    resume_path = resolve_resume(run_dir, cfg.trainer.resume)
    resumed = checkpoint.load(resume_path, "trainer.resume") if resume_path else None
    fork = resumed is not None and cfg.trainer.resume not in ("auto", "if_any")
    if resumed is not None:
        check_same_run(cfg, resumed, fork=fork)
        check_same_world(resumed, world)
    overrides, group = _hydra_context()
    plan = checked_plan(cfg, world)
    task, objective = plan.task, plan.objective
    write = write_json if world.is_main else (lambda *_: None)
    console = (lambda total: ConsoleReporter(total, tty=tty)) if world.is_main else (
        lambda total: SilentReporter())

    device = pick_device(cfg.trainer.device)
    if device.type == "cuda":   # kernel autotuning: speed over bit-exact repeatability
        torch.backends.cudnn.benchmark = bool(cfg.trainer.get("cudnn_benchmark", False))
    data = data if data is not None else build_data(cfg.dataset).to(device)
    if plan.pgd is not None:
        pixel_stats(data.test, "eval.pgd")   # an attack needs a [0, 1] pixel space
    # the teacher store trains a missing teacher with this very function (injected: the
    # teachers/ floor never imports the runner)
    if not world.is_main:
        world.barrier()   # rank 0 resolves the teachers first, training any the store lacks
    # dataset=distilled: a teacher the store trains learns the SOURCE data, never the set
    teacher_data = data.teacher_data or data
    if objective.needs_teacher and model_node(cfg.teacher) is not None:
        # what the teacher's signal will be stored as (the LM task's packed top-k rows) is
        # refused now, from the data alone, rather than after a teacher is trained
        task.stored_signal(objective, data, str(cfg.teacher.outputs_dtype))
    if hasattr(objective, "check_data"):   # an objective's own data-only refusals (seqkd)
        objective.check_data(data)
    teacher, pool, teacher_info = teacher_models(cfg, objective, teacher_data, device,
                                                 console(0),
                                                 store_access(cfg, teacher_data, tty, run))
    for name, node in task.stored_models().items():   # e.g. the diffusion task's classifier
        model, info = resolve_teacher(node, teacher_data, device, console(0),
                                      store_access(cfg, teacher_data, tty, run), role=name)
        task.use_stored(name, model, info)
        if hasattr(objective, "use_stored"):   # e.g. DMD's regression in the classifier's space
            objective.use_stored(name, model, teacher_data)
        teacher_info.update({keys.join(name, k): v for k, v in info.items()})
    if world.is_main:
        world.barrier()
    teachers = [model for _, model, _ in pool]
    if plan.label_free:   # after the teacher: a teacher the store trains learns from the labels
        data = unlabeled.student_view(cfg.dataset, data, lambda node: build_data(
            node, "dataset.extra_unlabeled"))
    student, channels_last = build_student(cfg, task, objective, teacher, teachers, data,
                                           device, world)
    settings = TrainerSettings.from_config(cfg.trainer, channels_last)
    steps_per_epoch = task.steps_per_epoch(data, settings.batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the "
                        f"{len(data.train)} training examples", "trainer.batch_size",
                        "Lower trainer.batch_size or raise dataset.limit_train")
    optimizer, scheduler = optimizer_and_schedule(
        cfg.optimizer, cfg.scheduler, trained_parameters(student, objective),
        steps_per_epoch, settings.epochs)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    previous = read_json(run_dir / "summary.json") if continuing else {}
    previous = previous if isinstance(previous, dict) else {}
    logger = build_logger(cfg.logger, run_dir=run_dir, config=resolved,
                          name=str(run_dir), group=group,
                          run_id=resumed.get(keys.WANDB_ID) if continuing and resumed else None
                          ) if world.is_main else NullLogger()
    summary = {keys.STATUS: "running", keys.TASK: task.name,
               keys.SELECTION_METRIC: task.selection_metric, keys.SEED: int(cfg.seed),
               keys.OVERRIDES: overrides,
               keys.GIT: provenance.git_revision(), keys.MACHINE: provenance.machine_kind(device),
               keys.RUN_DIR: str(run_dir),
               keys.DATASET: data.name, keys.STUDENT: cfg.student.arch,
               keys.TEACHER_ARCH: cfg.teacher.get("arch"),
               keys.LOSS: cfg.loss._target_.rsplit(".", 1)[-1],
               keys.WANDB_ID: logger.run_id, **teacher_info, keys.THREADS: threads,
               keys.CHANNELS_LAST: settings.channels_last, keys.WORLD_SIZE: world.size,
               keys.EVAL_VIEW: getattr(objective, "eval_view", "raw"),
               keys.MALLOC_TUNED: allocator.tuned()}   # runs/allocator.py
    forked_from = fork_record(resume_path, resumed) if fork else (
        resumed.get(keys.FORKED_FROM) if resumed is not None else None)
    if forked_from:   # a fork says so in its summary and in every checkpoint it writes
        summary[keys.FORKED_FROM] = forked_from
    write(run_dir / "summary.json", summary)
    reporter = console(steps_per_epoch * settings.epochs)
    meta = {"config": resolved, "overrides": overrides,
            "model_config": OmegaConf.to_container(model_node(cfg.student)),
            "data": {"name": data.name, "num_classes": data.num_classes,
                     "input_shape": list(data.input_shape)},
            "git": summary[keys.GIT], "code_version": __version__,
            keys.WORLD_SIZE: world.size, **({keys.FORKED_FROM: forked_from} if forked_from else {})}
    topology = choose_topology(cfg, task=task, objective=objective, teacher=teacher, pool=pool,
                               teacher_info=teacher_info, data=data, device=device,
                               reporter=reporter, mix=plan.mix, steps_per_epoch=steps_per_epoch,
                               channels_last=settings.channels_last, world=world)
    summary.update(topology.summary())
    data_seed = int(cfg.data_seed)
    engine = Engine(task=task, student=student, objective=objective, teacher=topology, data=data,
                    batches=lambda epoch, start: map(world.slice, task.train_batches(
                        data, settings.batch_size, data_seed, epoch, start, plan.mix)),
                    optimizer=optimizer, scheduler=scheduler, settings=settings, device=device,
                    sinks=RunSinks(run_dir, reporter, logger, meta), world=world)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    exit_code = 1
    try:
        if resumed is not None:
            engine.restore(resumed)
            if fork:
                start_fork_best(engine, resume_path, run_dir, world)
            if world.is_main and not fork:
                metrics.truncate_after(engine.state.epoch)
                restore_epoch_row(metrics, engine.state.epoch, engine.state.epoch_row)
            reporter.stage(f"resumed from {resume_path} at epoch {engine.state.epoch + 1}, "
                           f"step {engine.state.step}")
        elif world.is_main and metrics.path.exists():   # a run started over: no epoch kept
            metrics.truncate_after(0)
        source = OmegaConf.to_container(cfg.dataset, resolve=True)
        if resumed is None and world.is_main:
            task.artifacts(student, run_dir, "start", data, logger, source)
        if restarting:
            reporter.stage(f"{run_dir} stopped before its first checkpoint: starting it over "
                           "from step 0")

        def on_epoch_end(row: dict) -> None:
            if world.is_main:
                metrics.append(row)
            logger.log(row, engine.state.step)
            reporter.epoch_end(row)

        try:
            status = engine.fit(on_epoch_end)
        except Diverged as diverged:
            exit_code = RunDiverged.exit_code
            summary.update(trained_so_far(engine, task, previous, started))
            summary.update({keys.STATUS: "diverged", keys.NONFINITE_STEP: diverged.step})
            write(run_dir / "summary.json", summary)
            raise RunDiverged(diverged, run_dir, settings.on_nonfinite) from None
        summary.update(trained_so_far(engine, task, previous, started))
        if status == "interrupted":
            summary[keys.STATUS] = "interrupted"
            write(run_dir / "summary.json", summary)
            signum = engine.stop.signum
            exit_code = 128 + signum if signum else 3
            reporter.stage(f"interrupted at step {engine.state.step}; last.pt written. " + (
                resume_hint or f"Resume: distill {' '.join(overrides)} hydra.run.dir={run_dir} "
                "trainer.resume=auto"))
            raise RunInterrupted(exit_code, run_dir)
        summary.update(final_evaluation(engine, run_dir, plan.mia, plan.pgd))
        if world.is_main:
            write_artifacts(engine, run_dir, logger, source)
        summary.update(topology.summary())
        summary[keys.STATUS] = "finished"
        summary[keys.WALL_S] = previous.get(keys.WALL_S, 0.0) + time.time() - started
        write(run_dir / "summary.json", summary)
        logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        logger.log_model({"best": run_dir / "checkpoints" / "best.pt",
                          "latest": run_dir / "checkpoints" / "last.pt"}, summary)
        reporter.summary_table(summary, title=str(run_dir))
        exit_code = 0
        return summary
    except (RunInterrupted, RunDiverged):
        raise
    except BaseException as exc:
        summary.update({keys.STATUS: "failed", keys.ERROR: f"{type(exc).__name__}: {exc}"[:500]})
        write(run_dir / "summary.json", summary)
        raise
    finally:
        logger.finish(exit_code)


def trained_parameters(student: nn.Module, objective) -> list:
    """What the run's optimizer trains: the student's parameters (or its own parameter groups,
    e.g. a synthetic set's learnable step size at its own lr) and the objective's heads."""
    heads = list(objective.parameters())
    groups = getattr(student, "optimizer_groups", None)
    if groups is None:
        return list(student.parameters()) + heads
    return groups() + ([{"params": heads}] if heads else [])


def trained_so_far(engine: Engine, task, previous: dict, started: float) -> dict:
    """The summary's record of the training done: position, best, speed, skipped steps and
    wall-clock time summed over the launches of the run."""
    s = engine.state
    return {keys.EPOCHS: s.epoch, keys.STEP: s.step, keys.BEST_EPOCH: s.best_epoch,
            keys.join(keys.BEST_VAL, task.selection_metric): (
                s.best_score if math.isfinite(s.best_score) else None),   # no epoch yet
            keys.TRAIN_IMAGES_PER_S: s.images_per_s, keys.NONFINITE_SKIPPED: s.skipped_steps,
            keys.WALL_S: previous.get(keys.WALL_S, 0.0) + time.time() - started}


def fork_record(path: Path, ckpt: dict) -> dict:
    """What a fork continued: the checkpoint, its position and the length it was trained for
    (a fork may change trainer.epochs; its schedules were computed for that length so far)."""
    state = ckpt.get("state", {})
    return {"checkpoint": str(path), "epoch": state.get("epoch"), "step": state.get("step"),
            "trainer.epochs": (ckpt.get("config", {}).get("trainer") or {}).get("epochs")}


def start_fork_best(engine: Engine, source: Path, run_dir: Path, world: World) -> None:
    """A fork continues its source's best-so-far (the restored state says which epoch): its
    best.pt starts as the source's, copied into the fork's dir, so a fork whose epochs never
    beat it (or that trains none) still has the best.pt its final evaluation reads. A source
    without one (a lone last.pt): best-so-far starts over with the fork's first epoch."""
    best = source if source.name == "best.pt" else source.parent / "best.pt"
    if not best.is_file():
        engine.state.best_score, engine.state.best_epoch = float("-inf"), 0
    elif world.is_main:
        with open(best, "rb") as src:
            atomic_write_bytes(run_dir / "checkpoints" / "best.pt",
                               lambda fh: shutil.copyfileobj(src, fh))


def restore_epoch_row(metrics: MetricsFile, epoch: int, row: str) -> None:
    """Append the checkpoint's line for `epoch` when metrics.jsonl lacks it: the run was
    killed after writing last.pt at the end of that epoch and before appending its line."""
    if not row or not epoch:
        return
    lines = metrics.path.read_text().splitlines() if metrics.path.exists() else []
    if any(json.loads(ln).get(keys.EPOCH) == epoch for ln in lines if ln.strip()):
        return
    metrics.append(json.loads(row))


def claim_run_dir(run_dir: Path, resume, world: World) -> bool | dict:
    """One run dir for the job: rank 0 alone applies the run-dir rules (runs/directory.py) and
    tells the others. True: this launch continues the run in it; False: a fresh run; a dict:
    `trainer.resume=if_any` found the run finished (its summary)."""
    verdict = None
    if world.is_main:
        try:
            verdict = check_run_dir(run_dir, resume)
        except RunFinished as done:
            verdict = done.summary
    return world.broadcast(verdict)


def build_student(cfg: DictConfig, task, objective, teacher, teachers: list, data, device,
                  world: World) -> tuple[nn.Module, bool]:
    """(the student, whether the run is NHWC): the student seeded by `seed`, with the
    objective's trainable heads bound to it (created from the models' shapes, optimised with
    the student, saved in checkpoints as `objective`, never in the exported student) and every
    network in the run's memory format (`trainer.channels_last`, models/memory_format.py)."""
    torch.manual_seed(int(cfg.seed))
    student = task.build_model(cfg.student, "student", data).to(device)
    if world.distributed and cfg.trainer.get("sync_batchnorm"):   # CUDA only (plan.py)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    objective.bind(student, teachers or teacher, data)
    objective.to(device)
    channels_last = channels_last_for(cfg.trainer.channels_last, data.input_shape, student)
    if channels_last:   # the objective's conv heads see the same NHWC maps
        for model in (student, teacher, *teachers, objective):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    return student, channels_last


def write_artifacts(engine: Engine, run_dir: Path, logger, source: dict) -> None:
    """The task's files of the last and the best (by val) student (tasks/base.py `artifacts`)."""
    student, task = engine.student, engine.task
    task.artifacts(student, run_dir, "last", engine.data, logger, source)
    current = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(checkpoint.load(run_dir / "checkpoints" / "best.pt",
                                            "trainer")["model"])
    task.artifacts(student, run_dir, "best", engine.data, logger, source)
    student.load_state_dict(current)


def check_same_world(ckpt: dict, world: World) -> None:
    """Resuming on another number of ranks would change the reduction order (and, with
    BatchNorm, the statistics): refused rather than continued inexactly."""
    then = int(ckpt.get(keys.WORLD_SIZE, 1))
    if then != world.size:
        raise UserError(f"The checkpoint was trained on {then} process(es) but this launch has "
                        f"{world.size}", "trainer.resume",
                        f"Resume with the same world size (torchrun --nproc_per_node={then}"
                        + (")" if then > 1 else " or plain `distill`)"))


def final_evaluation(engine: Engine, run_dir: Path, mia: dict | None = None,
                     pgd: dict | None = None) -> dict:
    """Test metrics of the best (by val) and last weights, and of the teacher(s) — once (an
    online teacher: its final weights). With `mia` (membership_auc options), membership
    inference of the best weights (`mia/*`) and of the teacher (`teacher/mia/*`). With `pgd`
    (robust_accuracy options, from `eval.pgd`), PGD robust accuracy of both (`*/test/pgd_acc1`)."""
    out = {}
    data, task, teacher = engine.data, engine.task, engine.teacher
    references = teacher.references("test")
    for prefix, outputs in references.items():
        t = task.score(outputs, data.test.targets)
        out.update({keys.join(prefix, "test", k): v for k, v in t.items() if k != "n"})
        if prefix == keys.TEACHER and mia is not None:
            out.update({keys.join(keys.TEACHER, k): v for k, v in membership_auc(
                teacher.model, data.train, data.test, **mia).items()})
    reference = references.get(keys.TEACHER)
    last = engine.evaluate(engine.student, data.test, reference)
    out.update({keys.join(keys.LAST_TEST, k): v for k, v in last.items() if k != "n"})
    if pgd is not None:
        out[keys.LAST_TEST_PGD_ACC1] = robust_accuracy(engine.student, data.test, **pgd)
    best_state = checkpoint.load(run_dir / "checkpoints" / "best.pt", "trainer")["model"]
    current = {k: v.clone() for k, v in engine.student.state_dict().items()}
    engine.student.load_state_dict(best_state)
    best = engine.evaluate(engine.student, data.test, reference)
    if pgd is not None:
        out[keys.BEST_TEST_PGD_ACC1] = robust_accuracy(engine.student, data.test, **pgd)
    if mia is not None:
        out.update(membership_auc(engine.student, data.train, data.test, **mia))
    engine.student.load_state_dict(current)
    out.update({keys.join(keys.BEST_TEST, k): v for k, v in best.items() if k != "n"})
    return out
