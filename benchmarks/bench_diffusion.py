"""Diffusion step distillation: what a training step costs per method, side by side in one
process, as a ratio to training the student alone (`dsm`, no teacher) — the classifier
benchmark's "KD with stored logits / CE" for generators.

Sampling the teacher is the expensive part of reflow / direct: their (noise, ODE endpoint) pairs
are sampled once into the output store (teachers/pairs.py), so a student trained on stored pairs
should cost what training it alone costs; the same student with pairs sampled LIVE each step
(the teacher's whole sampler per batch) shows what the store saves. Progressive and consistency
distillation run the teacher inside every step (2 DDIM evaluations, 2 Heun evaluations) and
cannot store it (their inputs are fresh noise levels each step).

The networks are untrained (the cost of a step does not depend on the weights); the one-time
cost of sampling the pairs and their size on disk are reported too.

    python benchmarks/bench_diffusion.py --out benchmarks/results/diffusion_bench.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = {   # name -> overrides (the table's recipes, student = teacher architecture)
    "digits 8x8, unet_tiny": ["recipe=diffusion_digits"],
    "Fashion-MNIST 28x28, unet_small": ["recipe=diffusion_fmnist", "dataset.limit_train=2000"],
}
METHODS = ["dsm", "reflow", "reflow_live", "direct", "progressive", "consistency"]


class LivePairs:
    """The pairs of `teacher_pairs`, sampled again for every batch (no store)."""

    def __init__(self, teacher, seed, steps, method, shape):
        self.teacher, self.seed, self.steps, self.method = teacher, seed, steps, method
        self.shape = shape

    def get(self, index):
        from distill_cli.models.diffusion import samplers
        from distill_cli.teachers.pairs import pair_noise

        noise = pair_noise(self.seed, index, self.shape)
        return noise, samplers.sample(self.teacher, noise, None, steps=self.steps,
                                      method=self.method)


def measure(overrides: list[str], steps: int, warmup: int, batch: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from distill_cli.config.build import build_data, build_model
    from distill_cli.config.paths import CONF_DIR
    from distill_cli.losses.base import StepContext
    from distill_cli.models.diffusion import samplers
    from distill_cli.teachers.pairs import teacher_pairs
    from distill_cli.training.plan import checked_plan

    torch.set_num_threads(1)
    out = {}
    store = tempfile.mkdtemp(prefix="bench-diffusion-")
    for method in METHODS:
        loss = "reflow" if method == "reflow_live" else method
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, f"loss={loss}",
                                                           "logger=none"])
        plan = checked_plan(cfg)
        objective, task = plan.objective, plan.task
        data = build_data(cfg.dataset)
        torch.manual_seed(0)
        teacher = build_model(cfg.teacher, "teacher", data).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student = task.build_model(cfg.student, "student", data)
        objective.bind(student, teacher if objective.needs_teacher else None, data)
        if getattr(objective, "pairs_options", None) is not None:
            started = time.perf_counter()
            pairs = teacher_pairs(teacher, data, store_root=store, **objective.pairs_options)
            out["pairs_s"] = time.perf_counter() - started
            npy = next(Path(store).glob("outputs/*/pairs.npy"))
            out["pairs_bytes_per_sample"] = npy.stat().st_size / len(pairs)
            out["pairs_n"] = len(pairs)
            if method == "reflow_live":
                pairs = LivePairs(teacher, 0, int(teacher.steps),
                                  samplers.resolve(teacher, teacher.sampler),
                                  tuple(data.train.x.shape[1:]))
            objective.use_pairs(pairs)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4)
        batches = _endless(task, data, batch)
        times = []
        total = steps + warmup
        for step in range(total):
            b = next(batches)
            ctx = StepContext(epoch=1, step=step, steps_per_epoch=total, total_steps=total)
            started = time.perf_counter()
            terms = objective.train_terms(student, student, _Topology(teacher), b, ctx)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            objective.after_step(terms, ctx)
            if step >= warmup:
                times.append(time.perf_counter() - started)
        out[method] = statistics.median(times)
    return out


def _endless(task, data, batch: int):
    """Training batches across epochs (a small split has fewer batches than the bench's steps)."""
    epoch = 1
    while True:
        yield from task.train_batches(data, batch, 0, epoch, 0, None)
        epoch += 1


class _Topology:
    """What `StepObjective.train_terms` reads of the run's teacher topology: the model."""

    def __init__(self, model):
        self.model = model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = ["# Diffusion step distillation: seconds per training step, side by side",
             "", f"`python benchmarks/bench_diffusion.py --steps {args.steps} --batch "
             f"{args.batch}` ({time.strftime('%Y-%m-%d')}, {platform.processor() or 'cpu'}, "
             "1 thread, untrained networks: the cost does not depend on the weights). Ratio = "
             "the method's step ÷ `dsm` (the student trained alone, no teacher).", "",
             "| case | " + " | ".join(METHODS) + " | pairs once (s) | pairs bytes/sample |",
             "|---|" + "---:|" * (len(METHODS) + 2)]
    for name, overrides in CASES.items():
        r = measure(overrides, args.steps, args.warmup, args.batch)
        cells = [f"{r[m]:.4f} s ({r[m] / r['dsm']:.2f}x)" for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {r['pairs_s']:.1f} ({r['pairs_n']} pairs) | "
                       f"{r['pairs_bytes_per_sample']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
