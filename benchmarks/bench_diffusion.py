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
METHODS = ["dsm", "reflow", "reflow_live", "direct", "progressive", "consistency", "dmd", "dmd2",
           "sid", "fdistill", "phased_dmd"]


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


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc)."""
    import os
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_one(overrides: list[str], method: str, steps: int, warmup: int, batch: int
                ) -> dict:
    """One method in THIS process (a fresh one per method, so peak memory is its own): median
    seconds per optimizer step, the peak resident memory the steps add over the built networks,
    and the parameters every network of the step holds. The step is the engine's: the
    objective's terms through the run's topology (a critic and its optimizer for the
    distribution-matching methods), one backward, every optimizer stepped."""
    import resource

    import torch
    from hydra import compose, initialize_config_dir

    from distill_cli.config.build import build_data, build_model
    from distill_cli.config.paths import CONF_DIR
    from distill_cli.losses.base import CriticObjective, StepContext
    from distill_cli.models.diffusion import samplers
    from distill_cli.teachers.samples import teacher_samples
    from distill_cli.teachers.topology import CriticTopology, TeacherSignal
    from distill_cli.training.distributed import SINGLE
    from distill_cli.training.plan import checked_plan

    torch.set_num_threads(1)
    out: dict = {}
    store = tempfile.mkdtemp(prefix="bench-diffusion-")
    loss = "reflow" if method == "reflow_live" else method
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"loss={loss}",
                                                       "logger=none"])
    plan = checked_plan(cfg)
    objective, task = plan.objective, plan.task
    data = build_data(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, "teacher", data).eval().requires_grad_(False)
    student = task.build_model(cfg.student, "student", data)
    objective.bind(student, teacher if objective.needs_teacher else None, data)
    if hasattr(objective, "use_stored"):   # DMD's regression distance: the feature classifier
        for name, node in task.stored_models().items():
            net = build_model(node, name, data).eval().requires_grad_(False)
            objective.use_stored(name, net, data)
    if getattr(objective, "stored_samples", None) == "pairs":
        started = time.perf_counter()
        pairs = teacher_samples("pairs", teacher, data, store_root=store,
                                **objective.samples_options)
        out["pairs_s"] = time.perf_counter() - started
        npy = next(Path(store).glob("outputs/*/pairs.npy"))
        out["pairs_bytes_per_sample"] = npy.stat().st_size / len(pairs)
        out["pairs_n"] = len(pairs)
        if method == "reflow_live":
            pairs = LivePairs(teacher, 0, int(teacher.steps),
                              samplers.resolve(teacher, teacher.sampler),
                              tuple(data.train.x.shape[1:]))
        objective.use_samples(pairs)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    if isinstance(objective, CriticObjective):
        critic = objective.build_critic(teacher)
        params = [p for p in critic.parameters() if p.requires_grad]
        c_opt = torch.optim.Adam(params, lr=1e-4)
        topology = CriticTopology(teacher, critic, c_opt,
                                  torch.optim.lr_scheduler.LambdaLR(c_opt, lambda _: 1.0),
                                  critic_first=objective.critic_first,
                                  grad_clip=objective.critic_grad_clip, world=SINGLE)
    else:
        topology = TeacherSignal()
        topology.model = teacher
    networks = [student, *([teacher] if objective.needs_teacher else []),
                *([topology.critic] if isinstance(topology, CriticTopology) else [])]
    out["held_mb"] = sum(p.numel() * p.element_size() for n in networks
                         for p in n.parameters()) / 2 ** 20
    batches = _endless(task, data, batch)
    times = []
    total = steps + warmup
    base = rss_mb()
    for step in range(total):
        b = next(batches)
        ctx = StepContext(epoch=1, step=step, steps_per_epoch=total, total_steps=total)
        started = time.perf_counter()
        terms = objective.train_terms(student, student, topology, b, ctx)
        opt.zero_grad(set_to_none=True)
        topology.zero_grad()
        total_loss = topology.backward_loss(terms)
        if total_loss.requires_grad:
            total_loss.backward()
        opt.step()
        topology.step(None)
        objective.after_step(terms, ctx)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    out["step_s"] = statistics.median(times)
    # ru_maxrss: KiB on Linux; the peak over the whole process, which built the networks first
    out["peak_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 0.0)
    return out


def measure(overrides: list[str], steps: int, warmup: int, batch: int) -> dict:
    """Every method of METHODS, each in its own process."""
    import json
    import subprocess

    out = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--one", method, "--steps", str(steps), "--warmup",
               str(warmup), "--batch", str(batch), "--", *overrides]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out[method] = r
        for k in ("pairs_s", "pairs_n", "pairs_bytes_per_sample"):
            if k in r and method != "reflow_live":
                out.setdefault(k, r[k])
    return out


def _endless(task, data, batch: int):
    """Training batches across epochs (a small split has fewer batches than the bench's steps)."""
    epoch = 1
    while True:
        yield from task.train_batches(data, batch, 0, epoch, 0, None)
        epoch += 1


def main() -> None:
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help="measure one method in this process (used by the table)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.overrides, args.one, args.steps, args.warmup,
                                     args.batch)))
        return
    lines = ["# Diffusion step distillation: seconds and memory per training step, side by side",
             "", f"`python benchmarks/bench_diffusion.py --steps {args.steps} --batch "
             f"{args.batch}` ({time.strftime('%Y-%m-%d')}, {platform.processor() or 'cpu'}, "
             "1 thread, untrained networks: the cost does not depend on the weights; each method "
             "in its own process). Ratio = the method's step ÷ `dsm` (the student trained "
             "alone, no teacher). Peak = the resident memory the steps add over the built "
             "networks; held = the parameters of every network the step uses (student, teacher, "
             "critic).", ""]
    for name, overrides in CASES.items():
        r = measure(overrides, args.steps, args.warmup, args.batch)
        lines += [f"## {name}", "",
                  f"Pairs sampled once: {r['pairs_s']:.1f} s for {r['pairs_n']} pairs, "
                  f"{r['pairs_bytes_per_sample']:.0f} bytes a sample on disk.", "",
                  "| method | s / step | ÷ dsm | peak MB added | networks held MB |",
                  "|---|---:|---:|---:|---:|"]
        for m in METHODS:
            x = r[m]
            lines.append(f"| `{m}` | {x['step_s']:.4f} | {x['step_s'] / r['dsm']['step_s']:.2f} "
                         f"| {x['peak_mb']:.0f} | {x['held_mb']:.1f} |")
        lines.append("")
        print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
