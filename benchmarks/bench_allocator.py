"""glibc allocator settings (distill_cli/runs/allocator.py) off vs on, side by side: ms a training
step and peak RSS, each workload in fresh 1-thread processes, off / on interleaved.

    python benchmarks/bench_allocator.py [--reps 3] [--steps 10] [--out benchmarks/results/allocator.md]

Workloads: the dataset-distillation evaluation's step (ConvNet-3 width 32, instance norm, 28x28,
batch 256: dd_fmnist_cpu's protocol, whose 256 x 32 x 32 x 32 activations are 33.5 MiB, just
above glibc's largest mmap threshold), the same net at batch 128 (16.8 MiB, below it), and a
classifier step (resnet8x4, 3x32x32, batch 64).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from statistics import median

WORKLOADS = {
    "dd eval step, ConvNet-3 w32 28x28, batch 256": ("convnet", 256),
    "dd eval step, ConvNet-3 w32 28x28, batch 128": ("convnet", 128),
    "classifier step, resnet8x4 3x32x32, batch 64": ("resnet8x4", 64),
}

CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from distill_cli.runs import allocator
tuned = allocator.tune()
torch.set_num_threads(1)
arch, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
if arch == "convnet":
    from distill_cli.tasks.dataset_distill.nets import build_net
    net = build_net({"arch": "convnet", "width": 32, "depth": 3, "norm": "instancenorm",
                     "act": "relu", "pool": "avgpool"}, (1, 28, 28), 10, 0)
    x = torch.randn(batch, 1, 28, 28)
else:
    from distill_cli.models import create
    net = create(arch, 100, 3, (32, 32))
    x = torch.randn(batch, 3, 32, 32)
y = torch.randint(10, (batch,))
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
def step():
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(2):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
ms = (time.perf_counter() - t) / steps * 1000
print(json.dumps({"tuned": tuned, "ms": ms,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def one(arch: str, batch: int, steps: int, flag: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", DISTILL_MALLOC_TUNING=flag)
    out = subprocess.run([sys.executable, "-c", CHILD, arch, str(batch), str(steps)], env=env,
                         check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["tuned"] == (flag == "1"), row
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = ["| workload | ms a step, off / on | on ÷ off (time) | peak RSS MiB, off / on |",
             "|---|---:|---:|---:|"]
    for name, (arch, batch) in WORKLOADS.items():
        runs = {"0": [], "1": []}
        for _ in range(args.reps):
            for flag in ("0", "1"):
                runs[flag].append(one(arch, batch, args.steps, flag))
        ms = {f: median(r["ms"] for r in rs) for f, rs in runs.items()}
        rss = {f: max(r["rss_mib"] for r in rs) for f, rs in runs.items()}
        lines.append(f"| {name} | {ms['0']:.0f} / {ms['1']:.0f} | {ms['1'] / ms['0']:.2f} | "
                     f"{rss['0']:.0f} / {rss['1']:.0f} |")
        print(lines[-1], flush=True)
    text = ("# glibc allocator settings off / on (DISTILL_MALLOC_TUNING=0 / 1)\n\n"
            f"`python benchmarks/bench_allocator.py --reps {args.reps} --steps {args.steps}`: "
            "fresh 1-thread processes, off and on interleaved, median ms a step over the "
            "repetitions, the largest peak RSS.\n\n" + "\n".join(lines) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
