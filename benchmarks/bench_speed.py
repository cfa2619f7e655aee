"""Speed benchmark of the runner on Fashion-MNIST (2-core CPU friendly).

Everything is measured side by side in ONE process, variants interleaved per repetition, and
reported as medians and ratios — never as an absolute time to assert on:

1. the floor: a minimal hand-written PyTorch loop, CE only and KD with a live teacher;
2. the runner (`launcher.run`): CE only, KD live, KD with stored teacher outputs (warm);
3. a sweep of N objectives x S seeds sharing one teacher and `data_seed` (including the
   one-time teacher-output pass) against N*S CE-only runs;
plus peak RSS, the effect of channels_last / torch.compile / threads, the allocator settings
of the `distill` entry point (in subprocesses), and the DataLoader path next to the in-memory one.

    python benchmarks/bench_speed.py --out benchmarks/results/speed.md   (make bench)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from distill_cli.config import build  # noqa: E402
from distill_cli.runs import checkpoint  # noqa: E402
from distill_cli.runs import provenance  # noqa: E402
from distill_cli.config.paths import CONF_DIR  # noqa: E402
from distill_cli.data.bundle import epoch_order  # noqa: E402
from distill_cli.training.run import run  # noqa: E402
from distill_cli.models.fold import fold_batchnorm  # noqa: E402

TEACHER = ["teacher=cnn", "teacher.convs_per_stage=1"]
STUDENT = ["student=cnn_small"]


def cfg_of(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def make_teacher_checkpoint(data, path: Path) -> None:
    """A teacher checkpoint in the runner's own format (speed does not depend on training)."""
    node = cfg_of(TEACHER).teacher
    torch.manual_seed(0)
    model = build.build_model(node, "teacher", data)
    checkpoint.save(path, {"model": model.state_dict(),
                           "model_config": {"arch": "cnn", "channels": [32, 64, 128],
                                            "convs_per_stage": 1, "dropout": 0.0},
                           "data": {"name": data.name, "num_classes": data.num_classes,
                                    "input_shape": list(data.input_shape)}})


def minimal_loop(data, steps: int, batch: int, teacher=None) -> float:
    """The floor: the least code that does the same work (img/s)."""
    torch.manual_seed(0)
    student = build.build_model(cfg_of(STUDENT).student, "s", data)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    train = data.train
    order = epoch_order(len(train), 0, 1)
    mean, std = train._mean, train._std
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x = (train.x.index_select(0, idx).float() / 255 - mean) / std
        y = train.y.index_select(0, idx)
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.inference_mode():
                t = teacher(x)
            t = t.clone()
            kl = F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(t / 4, 1),
                          reduction="batchmean", log_target=True)
            loss = 0.1 * loss + 0.9 * 16 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def runner(overrides, workdir: Path, tag: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
    t0 = time.perf_counter()
    summary = run(cfg_of(overrides), run_dir / "run", tty=False)
    summary["bench_wall_s"] = time.perf_counter() - t0
    return summary


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150, help="training steps per measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sweep-epochs", type=int, default=3,
                    help="epochs per sweep run (the one-time teacher pass is amortised over them)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/speed.md"))
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    os.environ["DISTILL_HOME"] = str(workdir / "home")
    os.environ["WANDB_MODE"] = "disabled"
    limit = args.steps * args.batch
    common = ["trainer.channels_last=false", "dataset=fashion_mnist", f"dataset.limit_train={limit}", "dataset.limit_eval=1024",
              "logger=none", "trainer.epochs=1", f"trainer.batch_size={args.batch}",
              "trainer.log_every_n_steps=1000000", "optimizer.lr=0.1", "optimizer.nesterov=true",
              "scheduler=none"] + STUDENT
    data = build.build_data(cfg_of(common).dataset)
    teacher_ckpt = workdir / "teacher.pt"
    make_teacher_checkpoint(data, teacher_ckpt)
    kd = common + TEACHER + [f"teacher.checkpoint={teacher_ckpt}", "loss=kd"]
    teacher = build.build_model(cfg_of(TEACHER).teacher, "t", data)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True)["model"])
    teacher.eval().requires_grad_(False)

    runner(kd + ["teacher.outputs=store"], workdir, "warm")   # builds the stored tables once
    variants = {
        "minimal CE": lambda: minimal_loop(data, args.steps, args.batch),
        "minimal KD live": lambda: minimal_loop(data, args.steps, args.batch, teacher),
        "runner CE": lambda: runner(common + ["loss=ce"], workdir, "ce")["train/images_per_s"],
        "runner KD live": lambda: runner(kd + ["teacher.outputs=live"], workdir,
                                         "kdl")["train/images_per_s"],
        "runner KD stored (warm)": lambda: runner(kd + ["teacher.outputs=store"], workdir,
                                                  "kds")["train/images_per_s"],
        "runner CE channels_last": lambda: runner(common + ["loss=ce", "trainer.channels_last=true"],
                                                  workdir, "cecl")["train/images_per_s"],
        "runner KD live channels_last": lambda: runner(
            kd + ["teacher.outputs=live", "trainer.channels_last=true"], workdir,
            "kdlcl")["train/images_per_s"],
    }
    # the frozen teacher's forward alone, BN folded (what runs use) vs not, NCHW / channels_last
    folded = copy.deepcopy(teacher)
    fold_batchnorm(folded)
    xb = (data.train.x[:args.batch].float() / 255 - data.train._mean) / data.train._std

    def teacher_ips(model, channels_last=False):
        m = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        x = xb.contiguous(memory_format=torch.channels_last) if channels_last else xb
        with torch.inference_mode():
            m(x)
            t0 = time.perf_counter()
            for _ in range(20):
                m(x)
        return 20 * args.batch / (time.perf_counter() - t0)

    for cl in (False, True):
        tag = " channels_last" if cl else ""
        variants[f"teacher forward{tag}"] = lambda cl=cl: teacher_ips(teacher, cl)
        variants[f"teacher forward, BN folded{tag}"] = lambda cl=cl: teacher_ips(folded, cl)
    results = {k: [] for k in variants}
    for name in variants:  # one untimed warm-up each (allocator, oneDNN kernels)
        variants[name]()
    for _ in range(args.reps):
        for name, fn in variants.items():
            results[name].append(fn())
    threads = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        threads[n] = {"runner CE": median([runner(common + ["loss=ce"], workdir, "t")[
            "train/images_per_s"] for _ in range(args.reps)]),
            "runner KD live": median([runner(kd + ["teacher.outputs=live"], workdir, "t")[
                "train/images_per_s"] for _ in range(args.reps)])}
    torch.set_num_threads(os.cpu_count() or 1)

    # torch.compile: startup cost and steady state (two epochs so the second is warm)
    comp = runner(common + ["loss=ce", "trainer.compile=true", "trainer.epochs=2"], workdir, "c")
    plain2 = runner(common + ["loss=ce", "trainer.epochs=2"], workdir, "c")

    # sweep: N objectives x S seeds, one teacher, fixed data_seed, fresh output store
    os.environ["DISTILL_HOME"] = str(workdir / "home_sweep")
    losses, seeds = ["kd", "dkd", "dist"], [0, 1]
    epochs = [f"trainer.epochs={args.sweep_epochs}"]
    sweep_wall = sum(runner(kd[:-1] + [f"loss={loss}", f"seed={s}", "data_seed=0",
                                       "teacher.outputs=auto"] + epochs, workdir,
                            "sw")["bench_wall_s"]
                     for loss in losses for s in seeds)
    ce_wall = sum(runner(common + ["loss=ce", f"seed={s}"] + epochs, workdir,
                         "swce")["bench_wall_s"]
                  for _ in losses for s in seeds)

    # DataLoader path vs in-memory, on the same images written as PNG files
    loader = {}
    folder = workdir / "folder"
    from torchvision.utils import save_image
    for split, part, n in (("train", data.train, 4096), ("val", data.test, 512)):
        for i in range(n):
            d = folder / split / str(int(part.y[i]))
            d.mkdir(parents=True, exist_ok=True)
            save_image(part.x[i].float() / 255, d / f"{i}.png")
    for mode in ("false", "true"):
        over = ["dataset=imagefolder", f"dataset.root={folder}", "dataset.image_size=28",
                f"dataset.in_memory={mode}", "dataset.num_workers=1", "logger=none",
                "trainer.epochs=1", f"trainer.batch_size={args.batch}", "loss=ce",
                "dataset.augment.random_resized_crop=false", "dataset.augment.hflip=false",
                "trainer.log_every_n_steps=1000000"] + STUDENT
        loader[mode] = median([runner(over, workdir, "if")["train/images_per_s"]
                               for _ in range(args.reps)])

    # allocator settings of the entry point (runs/allocator.py), in fresh processes
    malloc = {}
    for flag in ("0", "1"):
        out = []
        for _ in range(args.reps):
            rd = Path(tempfile.mkdtemp(dir=workdir)) / "run"
            env = {**os.environ, "DISTILL_MALLOC_TUNING": flag}
            for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
                env.pop(k, None)
            subprocess.run([str(Path(sys.executable).parent / "distill"), *kd,
                            "teacher.outputs=live", f"hydra.run.dir={rd}"], env=env, check=True,
                           capture_output=True)
            s = json.loads((rd / "summary.json").read_text())
            assert s["malloc_tuned"] == (flag == "1")
            out.append(s["train/images_per_s"])
        malloc[flag] = median(out)

    # peak RSS of single `distill` runs on the FULL training set (fresh processes, GNU time)
    single_rss = {}
    full = [o for o in kd if not o.startswith(("dataset.limit_", "loss="))]
    base_cmd = ["/usr/bin/time", "-f", "%M", str(Path(sys.executable).parent / "distill")]
    for name, extra in (("CE (teacher attached for evaluation)", ["loss=ce"]),
                        ("KD, stored teacher outputs", ["loss=kd", "teacher.outputs=store"]),
                        ("KD, live teacher", ["loss=kd", "teacher.outputs=live"])):
        rd = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        done = subprocess.run([*base_cmd, *full, *extra, f"hydra.run.dir={rd}"],
                              capture_output=True, text=True, check=True)
        single_rss[name] = int(done.stderr.strip().splitlines()[-1]) / 2**20   # KiB -> GiB
    single_rss["`import torch, hydra, torchvision` alone"] = int(subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-c", "import torch, hydra, torchvision"],
        capture_output=True, text=True, check=True).stderr.strip().splitlines()[-1]) / 2**20

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    data_gib = sum(t.numel() * t.element_size() for t in (data.train.x, data.val.x,
                                                           data.test.x)) / 2**30
    med = {k: median(v) for k, v in results.items()}
    cpu = provenance.cpu_model()
    lines = [
        "# Speed benchmark (Fashion-MNIST, `cnn` teacher -> `cnn_small` student)", "",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {cpu}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}; batch {args.batch}, "
        f"{args.steps} steps per measurement, {args.reps} interleaved repetitions (medians)", "",
        "| variant | images/s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in med.items()]
    def ratio(fast: str, slow: str) -> str:
        """Time ratio slow/fast: median of the per-repetition ratios (each repetition runs the
        variants back to back, so a ratio compares neighbours) with its min-max range."""
        r = sorted(a / b for a, b in zip(results[fast], results[slow]))
        return f"{median(r):.3f} ({r[0]:.3f}-{r[-1]:.3f})"

    goals = [
        ("runner ÷ minimal loop, CE (time)", ratio("minimal CE", "runner CE"), "≤ 1.05"),
        ("runner ÷ minimal loop, KD live (time)", ratio("minimal KD live", "runner KD live"),
         "≤ 1.05"),
        ("KD stored ÷ CE only (time)", ratio("runner CE", "runner KD stored (warm)"), "≤ 1.10"),
        ("KD live ÷ CE only (time, for reference)", ratio("runner CE", "runner KD live"), "—"),
        (f"sweep {len(losses)}x{len(seeds)} ÷ {len(losses) * len(seeds)} CE runs (wall, "
         f"{args.sweep_epochs}-epoch runs, incl. the one-time teacher-output pass)",
         f"{sweep_wall / ce_wall:.3f}", "≤ 1.2"),
        ("peak RSS GiB of this benchmark process (dataset {:.2f} GiB + models + 1 GiB)".format(
            data_gib), f"{rss_gib:.3f}", f"≤ {data_gib + 1.05:.2f}"),
    ]
    lines += ["", "| frozen teacher forward (inference, batch {}) | BN folded ÷ not (time) |".format(
        args.batch), "|---|---:|",
        f"| NCHW | {ratio('teacher forward', 'teacher forward, BN folded')} |",
        f"| channels_last | "
        f"{ratio('teacher forward channels_last', 'teacher forward, BN folded channels_last')} |"]
    lines += ["", "| goal | measured: median (range over repetitions) | target |",
              "|---|---:|---:|"]
    lines += [f"| {g} | {v} | {t} |" for g, v, t in goals]
    lines += ["", "Options on this CPU (images/s, medians):", "",
              "| option | CE | KD live |", "|---|---:|---:|",
              f"| default (NCHW) | {med['runner CE']:,.0f} | {med['runner KD live']:,.0f} |",
              f"| trainer.channels_last=true | {med['runner CE channels_last']:,.0f} | "
              f"{med['runner KD live channels_last']:,.0f} |"]
    lines += [f"| torch threads = {n} | {v['runner CE']:,.0f} | {v['runner KD live']:,.0f} |"
              for n, v in threads.items()]
    lines += [f"| trainer.compile=true (2 epochs; wall {comp['bench_wall_s']:.1f} s vs "
              f"{plain2['bench_wall_s']:.1f} s eager) | {comp['train/images_per_s']:,.0f} "
              f"(eager {plain2['train/images_per_s']:,.0f}) | — |",
              f"| `distill` allocator settings off / on (DISTILL_MALLOC_TUNING=0/1, KD live, "
              f"fresh processes) | — | {malloc['0']:,.0f} / {malloc['1']:,.0f} |",
              f"| data path: imagefolder DataLoader / in-memory (4096 PNGs, CE) | "
              f"{loader['false']:,.0f} / {loader['true']:,.0f} | — |"]
    full_gib = (len(data.val) + len(data.test) + 54000) * 784 / 2**30
    lines += ["", f"Peak RSS of single runs, full Fashion-MNIST ({full_gib:.2f} GiB as uint8), "
              "1 epoch, fresh `distill` processes (GNU time):", "",
              "| run | peak RSS GiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in single_rss.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
