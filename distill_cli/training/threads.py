"""The run's share of the CPU cores (`trainer.threads`).

Measured on this project's 2-core machine: two runs side by side with torch's default threads
(each takes every core) did 0.52x the work of one run alone, together; with one thread each,
1.44x (benchmarks/results/threads.md). So whatever starts several
processes gives each cores // processes threads: the joblib and local-array launchers set
OMP_NUM_THREADS for their jobs, and torchrun's ranks take cores // ranks-per-node here.
"""
from __future__ import annotations

import os

import torch

from distill_cli.errors import UserError


def apply_thread_budget(threads) -> int:
    """`threads`: a positive int, or "auto" (OMP_NUM_THREADS when set — a launcher's budget —
    else cores // torchrun ranks on this node, else torch's default: every core). Returns the
    number of threads the run trains with."""
    if threads != "auto":
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserError(f"trainer.threads={threads!r} must be a positive integer or auto",
                            "trainer.threads", "Use trainer.threads=auto (the default) or e.g. 1")
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        ranks = max(int(os.environ["LOCAL_WORLD_SIZE"]), 1)
        torch.set_num_threads(max((os.cpu_count() or 1) // ranks, 1))
    return torch.get_num_threads()
