"""Data-parallel training across processes (torchrun): the world a run is part of.

`torchrun --standalone --nproc_per_node=N -m distill_cli <overrides>` starts N ranks. Every rank
builds the same GLOBAL batch from (data_seed, epoch, step) and keeps its contiguous slice, so
order, augmentation, mixing, stored teacher outputs and exact resume work as in one process;
the student is wrapped in DistributedDataParallel (its gradients averaged over ranks during
backward), and every other trained parameter (an objective's heads, an online teacher) is
averaged after backward. Rank 0 alone writes the run dir, checkpoints and W&B. One process is
the world of size 1, and every hook below is then a no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

#: collectives wait this long: rank 0 may train a missing teacher while the others wait
TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (a stop request on one rank stops
        all of them at the same step)."""
        return bool(self._reduce(1 if flag else 0, dist.ReduceOp.MAX))

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the first non-finite step)."""
        return self._reduce(value, dist.ReduceOp.MIN)

    def _reduce(self, value: int, op) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_gradients(self, params) -> None:
        """Average `.grad` over ranks (parameters outside the DDP-wrapped student)."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def slice(self, batch):
        """This rank's contiguous part of a global batch (a NamedTuple of tensors)."""
        if not self.distributed:
            return batch
        n = len(batch[0]) // self.size
        lo = self.rank * n
        return type(batch)(*(t[lo:lo + n] for t in batch))

    def wrap(self, student: nn.Module, device: torch.device) -> nn.Module:
        """The student's forward for training: DistributedDataParallel over the world."""
        if not self.distributed:
            return student
        ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=ids)


SINGLE = World()


def join_submitit_tasks() -> None:
    """A submitit job (hydra/launcher=slurm or local_array) with several tasks: each task is
    one data-parallel rank. submitit's own helper exports torchrun's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the job's nodes and id), so the rest of the
    runner sees exactly what torchrun would give it. Every task keeps all of the job's GPUs
    visible: `init_world` picks its own by LOCAL_RANK. A no-op outside submitit or with 1 task."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world() -> World:
    """The world of this process: joins the torchrun group (gloo for CPU tensors, nccl for CUDA
    ones when CUDA is there) once; the world of size 1 outside torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))
