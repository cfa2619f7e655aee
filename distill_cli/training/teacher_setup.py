"""The run's teacher topology, chosen once from the objective's TYPE and the teacher setup:

    PoolObjective     -> TeacherPool     (the `teachers` list; stored tables unless it steps itself)
    no teacher        -> TeacherSignal   (nothing to read)
    OnlineObjective   -> OnlineTeacher   (a fresh teacher with its own optimizer and scheduler)
    CriticObjective   -> CriticTopology  (a frozen teacher and an online critic: DMD's fake score)
    anything else     -> FrozenTeacher   (stored outputs when possible, else live)

The engine only calls the topology's hooks (teachers/topology.py).
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from distill_cli import keys
from distill_cli.config.build import build_optimizer, build_scheduler
from distill_cli.losses.base import CriticObjective, OnlineObjective, PoolObjective
from distill_cli.teachers.build import StoreAccess
from distill_cli.teachers.outputs import OutputSettings, outputs_for_pool, outputs_for_run
from distill_cli.teachers.pool import resolve_pool
from distill_cli.teachers.resolve import resolve_teacher
from distill_cli.teachers.samples import teacher_samples
from distill_cli.teachers.topology import (CriticTopology, FrozenTeacher, OnlineTeacher,
                                           TeacherPool, TeacherSignal)


def teacher_models(cfg: DictConfig, objective, data, device, reporter, access: StoreAccess
                   ) -> tuple:
    """(teacher or None, pool [(entry node, model, info)] or [], summary info): the one
    teacher (store, checkpoint or online), or a `PoolObjective`'s pool (its scores set)."""
    if not isinstance(objective, PoolObjective):
        online = type(objective).__name__ if isinstance(objective, OnlineObjective) else None
        teacher, info = resolve_teacher(cfg.teacher, data, device, reporter, access,
                                        online=online,
                                        fold=not objective.keeps_teacher_batchnorm)
        return teacher, [], info
    pool, scores, info = resolve_pool(cfg.teacher, cfg.teachers, data, device, reporter, access,
                                      int(cfg.trainer.eval_batch_size),
                                      str(cfg.trainer.precision))
    objective.set_scores(scores)
    info[keys.TEACHERS_WEIGHTS] = objective.teacher_weights.tolist()
    return None, pool, info


def optimizer_and_schedule(opt_node, sched_node, params: list, steps_per_epoch: int,
                           epochs: int) -> tuple:
    optimizer = build_optimizer(opt_node, params)
    return optimizer, build_scheduler(sched_node, optimizer, steps_per_epoch, epochs)


def output_settings(cfg: DictConfig, channels_last: bool) -> OutputSettings:
    return OutputSettings(mode=str(cfg.teacher.outputs), dtype=str(cfg.teacher.outputs_dtype),
                          root=str(cfg.store.root), max_gb=float(cfg.store.max_gb),
                          batch_size=int(cfg.trainer.batch_size),
                          epochs=int(cfg.trainer.epochs), data_seed=int(cfg.data_seed),
                          precision=str(cfg.trainer.precision), channels_last=channels_last)


def choose_topology(cfg: DictConfig, *, task, objective, teacher, pool: list, teacher_info: dict,
                    data, device, reporter, mix, steps_per_epoch: int, channels_last: bool,
                    world=None) -> TeacherSignal:
    common = dict(task=task, data=data, eval_batch_size=int(cfg.trainer.eval_batch_size),
                  device=device, precision=cfg.trainer.precision)
    dtype = str(cfg.teacher.outputs_dtype)
    row = task.stored_row_shape(data)
    stored = output_settings(cfg, channels_last)
    # what a single frozen teacher serves (stored or live alike): the logits, or a task's
    # compact form of them (the LM task's packed top-k rows for loss=topk)
    signal = task.stored_signal(objective, data, dtype) if teacher is not None else None
    if isinstance(objective, PoolObjective):
        outputs = outputs_for_pool(stored, pool, objective, data, device, reporter, mix, row)
        return TeacherPool([model for _, model, _ in pool], outputs, dtype, **common)
    if teacher is None:
        return TeacherSignal(**common)
    if isinstance(objective, OnlineObjective):
        # its own optimizer/scheduler (default: the student's settings)
        optimizer, scheduler = optimizer_and_schedule(
            cfg.loss.get("teacher_optimizer", cfg.optimizer),
            cfg.loss.get("teacher_scheduler", cfg.scheduler), list(teacher.parameters()),
            steps_per_epoch, int(cfg.trainer.epochs))
        return OnlineTeacher(teacher, optimizer, scheduler, **common)
    samples = getattr(objective, "stored_samples", None)
    if samples is not None:
        # teacher samples generated once into the output store (teachers/samples.py: a
        # diffusion teacher's (noise, endpoint) pairs, an LM teacher's sequences); the
        # objective reads them, not the teacher's per-step outputs
        objective.use_samples(teacher_samples(samples, teacher, data, store_root=stored.root,
                                              **objective.samples_options))
    if isinstance(objective, CriticObjective):
        critic = objective.build_critic(teacher).to(device)
        if channels_last:
            critic.to(memory_format=torch.channels_last)
        optimizer, scheduler = optimizer_and_schedule(
            cfg.loss.get("critic_optimizer", cfg.optimizer),
            cfg.loss.get("critic_scheduler", cfg.scheduler),
            [p for p in critic.parameters() if p.requires_grad], steps_per_epoch,
            int(cfg.trainer.epochs))
        return CriticTopology(teacher, critic, optimizer, scheduler,
                              critic_first=objective.critic_first,
                              grad_clip=objective.critic_grad_clip, world=world, **common)
    outputs = outputs_for_run(stored, objective, teacher, cfg.teacher, teacher_info, data, device,
                              reporter, mix, signal.row_shape, signal.transform, signal.identity)
    return FrozenTeacher(teacher, outputs, dtype,
                         feeds_training=objective.needs_teacher and samples is None,
                         transform=signal.transform, **common)
