"""Where a run's numbers came from: the code's git revision and the kind of machine whose
kernels computed them (summary.json's `git` and `machine`, the stores' entries, the reports)."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def git_revision() -> str:
    """`<sha>[-dirty]` of the checkout this package runs from, or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def machine_kind(device: torch.device | str) -> str:
    """The kind of machine whose kernels compute a run on `device`, e.g. "Intel(R) Xeon(R)
    Processor (AVX512), torch 2.14.1" or "NVIDIA H200, CUDA 12.8, torch 2.14.1".

    Runs are bit-exact within one kind, not across: torch's, oneDNN's and MKL's CPU kernels
    pick their code by instruction set (ATen's capability, named here) and vendor (in the
    model name), CUDA's by device and toolkit. Recorded so that a different number can be
    traced to a different machine rather than to the code.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def trained_elsewhere(recorded, device: torch.device | str) -> str:
    """For a stored artifact's reuse line (a teacher, MTT's experts): `" on another kind of
    machine: <kind>"` when the kind that trained it (`recorded`, its entry's `machine`) is not
    this run's — trained here, the same store key would hold other last bits — else "" (the
    same kind, or an entry written before entries recorded it)."""
    if not isinstance(recorded, str) or recorded == machine_kind(device):
        return ""
    return f" on another kind of machine: {recorded}"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
