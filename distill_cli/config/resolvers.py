"""OmegaConf resolvers the configs use, registered when the CLI starts.

`${launch_time:FORMAT}`: the job's launch time, formatted. One instant per process (the date
and the time of a run dir can never straddle midnight apart), and the same instant on every
torchrun rank: rank 0's clock, handed to the others through `DISTILL_LAUNCH_TIME` (ISO 8601),
so all ranks of a job agree on one run directory.

`${dc_set_updates:IPC,OUTER_LOOP,N}`: the set updates (engine steps) of N of DC / DSA's authors'
iterations, each `outer_loop` updates on one fresh network (`auto`: the authors' get_loops by
IPC) — so a recipe can give DC the authors' 1,000 iterations at every IPC (10,000 updates at
IPC 10, 50,000 at IPC 50) where a plain step count would give IPC 10 a tenth of them.
"""
from __future__ import annotations

import datetime
import os

from omegaconf import OmegaConf

LAUNCH_TIME_ENV = "DISTILL_LAUNCH_TIME"
_launch: datetime.datetime | None = None


def launch_time(fmt: str) -> str:
    global _launch
    if _launch is None:
        given = os.environ.get(LAUNCH_TIME_ENV)
        _launch = datetime.datetime.fromisoformat(given) if given else datetime.datetime.now()
    return _launch.strftime(fmt)


def dc_set_updates(ipc, outer_loop, iterations) -> int:
    """`outer_loop: auto` is the authors' get_loops, whose outer loop equals the IPC at every IPC
    it lists (1, 10, 20, ..., 50; methods/dc.py AUTHORS_LOOPS; the objective refuses others)."""
    per_iteration = int(ipc) if str(outer_loop) == "auto" else int(outer_loop)
    return per_iteration * int(iterations)


def register() -> None:
    OmegaConf.register_new_resolver("launch_time", launch_time, replace=True)
    OmegaConf.register_new_resolver("dc_set_updates", dc_set_updates, replace=True)
