"""Dataset distillation: time and peak memory per outer iteration (one update of the synthetic
set), for each method, and MTT's growth with its unroll length (`loss.syn_steps`).

Each configuration runs in its own subprocess (a clean high-water mark): it composes the real
config (`recipe=dd_digits` or `--recipe`), builds the task, the set and the objective as a run does,
times `--steps` updates after `--warmup`, and reports the median seconds per update and the peak
resident memory above the process's resident size just before the first update (ru_maxrss: the
high-water mark the updates added: networks, activations, the unrolled graph).

    python benchmarks/bench_dd.py --out benchmarks/results/dd_bench.md
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ["dc", "dsa", "dm", "datadam", "mtt", "sre2l"]


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def one(recipe: str, loss: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from distill_cli.config.build import build_data
    from distill_cli.config.paths import CONF_DIR
    from distill_cli.losses.base import StepContext
    from distill_cli.training.plan import checked_plan
    from distill_cli.training.run import trained_parameters
    from distill_cli.training.teacher_setup import optimizer_and_schedule

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"recipe={recipe}", f"loss={loss}",
                                                       "logger=none", *overrides])
    plan = checked_plan(cfg)
    task, objective = plan.task, plan.objective
    data = build_data(cfg.dataset)
    teacher = None
    if objective.needs_teacher:   # a quickly trained stand-in classifier with BatchNorm
        from distill_cli.config.build import build_model
        teacher = build_model(cfg.teacher, "teacher", data).eval()
    torch.manual_seed(0)
    student = task.build_model(cfg.student, "student", data)
    objective.bind(student, teacher, data)
    total = steps + warmup
    optimizer, scheduler = optimizer_and_schedule(cfg.optimizer, cfg.scheduler,
                                                  trained_parameters(student, objective),
                                                  total, 1)

    class Topology:   # what StepObjective.train_terms reads
        model = teacher
        models = [teacher]

    batches = task.train_batches(data, 1, 0, 1, 0, None)
    before = rss_mb()
    times = []
    for step in range(total):
        batch = next(batches)
        ctx = StepContext(epoch=1, step=step, steps_per_epoch=total, total_steps=total)
        t0 = time.perf_counter()
        terms = objective.train_terms(student, student, Topology, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        objective.after_step(terms, ctx)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": loss, "overrides": " ".join(overrides), "s_per_update": statistics.median(times),
            "peak_extra_mb": max(peak - before, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="dd_digits")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--unrolls", nargs="*", type=int, default=[5, 10, 20, 40],
                    help="MTT's loss.syn_steps values, each a row of its own")
    ap.add_argument("--home", default="/tmp/bench-dd-home",
                    help="DISTILL_HOME of the runs: MTT's experts are trained into its store "
                         "once (pass a table's home to reuse its experts)")
    ap.add_argument("--one", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        loss, *overrides = args.one
        recipe = args.recipe if loss not in ("sre2l", "cda") else f"{args.recipe}_sre2l"
        print(json.dumps(one(recipe, loss, overrides, args.steps, args.warmup)))
        return
    configs = [(m, ["student.ipc=10"]) for m in args.methods]
    configs += [("mtt", ["student.ipc=10", f"loss.syn_steps={n}"]) for n in args.unrolls]
    rows = []
    for loss, overrides in configs:
        proc = subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--steps",
                               str(args.steps), "--warmup", str(args.warmup), "--one", loss,
                               *overrides], capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                                   "PATH": "/usr/bin:/bin", "DISTILL_HOME": args.home})
        if proc.returncode:
            rows.append({"loss": loss, "overrides": " ".join(overrides),
                         "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"# Dataset distillation: seconds and peak memory per set update ({args.recipe})", "",
             f"- command: `python benchmarks/bench_dd.py --recipe {args.recipe} --steps "
             f"{args.steps} --warmup {args.warmup}"
             + (f" --methods {' '.join(args.methods)}" if args.methods != METHODS else "")
             + (f" --unrolls {' '.join(map(str, args.unrolls))}"
                if args.unrolls != [5, 10, 20, 40] else "") + "`",
             f"- machine: {platform.processor() or platform.machine()}, 1 thread, "
             f"{time.strftime('%Y-%m-%d')}; median of {args.steps} updates after {args.warmup}",
             "- peak MB: the resident high-water mark the updates added (networks, activations, "
             "MTT's unrolled graph) above the process before the first update", "",
             "| loss | overrides | s / update | peak MB |", "|---|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['overrides']} | error: {r['error']} | |")
        else:
            lines.append(f"| {r['loss']} | {r['overrides']} | {r['s_per_update']:.3f} | "
                         f"{r['peak_extra_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
