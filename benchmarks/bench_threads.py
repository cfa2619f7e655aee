"""Thread budgets side by side: what happens to training speed when runs share the cores.

One job (Fashion-MNIST, 20,000 training images, `cnn_small`, CE, 2 epochs, no teacher), run
  alone                   with torch's default threads (every core);
  two at once             default threads, then OMP_WAIT_POLICY=PASSIVE, then trainer.threads=1;
  a 2-job sweep           serially (basic launcher) vs `hydra/launcher=local_array` (2 slots,
                          cores // 2 threads each).
Throughput is each run's own `train/images_per_s` (summary.json); the sweep compares wall time.
Ratios, not absolute numbers, are the result (the same machine, one after another, nothing
else running). `python benchmarks/bench_threads.py --out benchmarks/results/threads.md`
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
JOB = ["dataset=fashion_mnist", "dataset.limit_train=20000", "student=cnn_small", "loss=ce",
       "teacher=none", "trainer.epochs=2", "logger=none", "trainer.batch_size=128"]


def start(run_dir: Path, env_extra: dict, extra: list[str] = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                           "OMP_WAIT_POLICY")}
    env.update(WANDB_MODE="disabled", **env_extra)
    return subprocess.Popen([str(BIN / "distill"), *JOB, *extra, f"hydra.run.dir={run_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def speed(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["train/images_per_s"]


def together(root: Path, name: str, env_extra: dict, extra: list[str] = ()) -> list[float]:
    procs = [start(root / f"{name}{i}", env_extra, extra) for i in range(2)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    return [speed(root / f"{name}{i}") for i in range(2)]


def sweep(root: Path, name: str, launcher: list[str]) -> float:
    t0 = time.perf_counter()
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
           "WANDB_MODE": "disabled"}
    subprocess.run([str(BIN / "distill"), "-m", *launcher, *JOB, "seed=0,1",
                    f"hydra.sweep.dir={root / name}"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    alone_p = start(root / "alone", {})
    alone_p.communicate()
    alone = speed(root / "alone")
    default = together(root, "default", {})
    passive = together(root, "passive", {"OMP_WAIT_POLICY": "PASSIVE"})
    one = together(root, "one", {}, ["trainer.threads=1"])
    serial = sweep(root, "serial", [])
    parallel = sweep(root, "parallel", ["hydra/launcher=local_array"])
    cores = os.cpu_count()
    rows = [("one run alone (default threads)", alone, [alone]),
            ("two at once, default threads", sum(default), default),
            ("two at once, OMP_WAIT_POLICY=PASSIVE", sum(passive), passive),
            ("two at once, trainer.threads=1 each", sum(one), one)]
    lines = [f"# Thread budgets ({cores} cores; {time.strftime('%Y-%m-%d')})", "",
             "`python benchmarks/bench_threads.py` — " + " ".join(JOB), "",
             "| how | images/s per run | together | ÷ one run alone |", "|---|---|---:|---:|"]
    for name, total, each in rows:
        lines.append(f"| {name} | {' + '.join(f'{v:,.0f}' for v in each)} | {total:,.0f} | "
                     f"{total / alone:.2f} |")
    lines += ["", "| 2-job sweep (seed=0,1) | wall s | ÷ serial |", "|---|---:|---:|",
              f"| serial (basic launcher) | {serial:.1f} | 1.00 |",
              f"| hydra/launcher=local_array (2 slots, cores // 2 threads) | {parallel:.1f} | "
              f"{parallel / serial:.2f} |", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
