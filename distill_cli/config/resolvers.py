"""OmegaConf resolvers the configs use, registered when the CLI starts.

`${launch_time:FORMAT}`: the job's launch time, formatted. One instant per process (the date
and the time of a run dir can never straddle midnight apart), and the same instant on every
torchrun rank: rank 0's clock, handed to the others through `DISTILL_LAUNCH_TIME` (ISO 8601),
so all ranks of a job agree on one run directory.
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


def register() -> None:
    OmegaConf.register_new_resolver("launch_time", launch_time, replace=True)
