"""glibc's malloc and PyTorch's large CPU buffers.

PyTorch takes every CPU tensor from malloc. glibc serves a request above its mmap threshold
(dynamic, never above 32 MiB on 64-bit) with a fresh `mmap` and unmaps it on free, so an
activation buffer of that size, allocated and freed every step, is page-faulted in again every
step: on this project's 2-core VM a 33.5 MiB `clone()` (one 256 x 32 x 32 x 32 activation of the
dataset-distillation evaluation's ConvNet) took 30.8 ms against 5.0 ms for a copy into a reused
buffer, and the whole training step took 1.8x as long (benchmarks/results/allocator.md).

`tune()` sets malloc's parameters through `mallopt`, in this process, before the first large
buffer: requests up to 64 MiB come from the heap (MMAP_THRESHOLD) and the heap keeps up to 256 MiB
of free top instead of returning it at once (TRIM_THRESHOLD). Larger buffers still come and go by
mmap: with a 1 GiB threshold (and 2 GiB kept) one DM update over 10,000 synthetic MNIST images
peaked at 6.37 GB against 5.08 GB with glibc's defaults, with these settings at 5.20 GB
(`/usr/bin/time -f %M distill recipe=dd_mnist_cpu loss=dm student.ipc=1000 task.iterations=1
task.eval.epochs=1 task.eval.models=1 ...`, 2026-12-01), while the evaluation step keeps its
speed-up. Numbers are unchanged (PyTorch aligns every buffer to 64 bytes either way).

On by default in `distill`; `DISTILL_MALLOC_TUNING=0` keeps glibc's defaults. A no-op without
glibc (macOS, musl) or when the user set glibc's own `MALLOC_*_` variables.
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV = "DISTILL_MALLOC_TUNING"
# mallopt's parameter numbers (malloc.h) and our values (C ints)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SETTINGS = ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 256 << 20))
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_tuned = False


def tune() -> bool:
    """Apply SETTINGS unless turned off (ENV=0), not glibc, or the user tuned glibc already;
    True when they are in force. Idempotent."""
    global _tuned
    if _tuned:
        return True
    if (os.environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc"
            or any(k in os.environ for k in GLIBC_VARIABLES)):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _tuned


def tuned() -> bool:
    """Whether this process runs with SETTINGS (for the run's summary)."""
    return _tuned
