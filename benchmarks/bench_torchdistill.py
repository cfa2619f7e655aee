"""Side by side with torchdistill: the same KD job trained by torchdistill and by this runner.

The job (issue #13 item 6): Fashion-MNIST (this repo's view: 54,000 train / 6,000 val / 10,000
test), teacher the zoo `cnn` (32/64/128, two convs a stage; trained once by the teacher store
with the fmnist_bench recipe's teacher settings), student `cnn_small`, Hinton KD (T 4, CE weight
0.1, KD weight 0.9 — torchdistill's KDLoss alpha 0.1), SGD lr 0.1 momentum 0.9 nesterov wd 5e-4,
constant lr, batch 256, 3 epochs, one process, the same torch threads. Measured: training
images/s over all epochs (images / seconds of the epochs' batch loops: no start-up, no
evaluation) of

  torchdistill KD (teacher live)  benchmarks/torchdistill/ (fmnist_kd.yaml, run_td.py), in its
                                  own venv, on the runner's arrays and the store's teacher weights
  ours KD live / KD stored / CE   `distill` runs (fresh processes), summary + metrics.jsonl

each in NCHW (trainer.channels_last=false) and in the runner's default (channels_last=auto,
NHWC for these conv nets; for torchdistill, which has no such option, run_td.py puts both
models and every batch in NHWC). Result: a markdown table with ratios ours ÷ torchdistill.

torchdistill (pinned) lives in benchmarks/.venv-torchdistill, created here on first use with
the same torch/torchvision as .venv (they install from this machine's disk); .venv is never
touched. Full job (make bench-torchdistill):
    .venv/bin/python benchmarks/bench_torchdistill.py --out benchmarks/results/torchdistill.md
A tiny check of the whole path: ... --limit 2000 --epochs 1 --out /tmp/td.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from distill_cli import keys  # noqa: E402
from distill_cli.errors import UserError  # noqa: E402
from distill_cli.io import atomic_write_bytes, read_json  # noqa: E402
from distill_cli.runs import provenance  # noqa: E402

TD_DIR = REPO / "benchmarks" / "torchdistill"
TD_VENV = REPO / "benchmarks" / ".venv-torchdistill"
TORCHDISTILL = "1.1.5"   # the newest release on PyPI when this was written
# torchdistill's venv gets the main venv's torch build: the versions that install from disk
PINS = ["torch==2.14.1", "torchvision==0.29.1", f"torchdistill=={TORCHDISTILL}"]

# The job, in the runner's overrides. The teacher.train settings are the fmnist_bench recipe's
# teacher, so a store that already trained it for the README's tables serves it as is.
JOB = ["dataset=fashion_mnist", "teacher=cnn", "student=cnn_small", "optimizer=sgd",
       "optimizer.lr=0.1", "optimizer.nesterov=true", "scheduler=none", "logger=none",
       "seed=0", "data_seed=0", "teacher.train.epochs=5", "teacher.train.batch_size=256",
       "teacher.train.optimizer.lr=0.1", "teacher.train.optimizer.nesterov=true"]
OURS = {"ours KD live": ["loss=kd", "teacher.outputs=live"],
        "ours KD stored": ["loss=kd", "teacher.outputs=store"],
        "ours CE": ["loss=ce"]}
TD = "torchdistill KD (teacher live)"
FORMATS = {"NCHW": "false", "default (channels_last=auto)": "auto"}


def check_args(args) -> None:
    for name in ("epochs", "batch", "threads", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}", f"--{name}",
                            f"Pass --{name} 1 or more")
    if args.limit is not None and args.limit < args.batch:
        raise UserError(f"--limit {args.limit} is smaller than one batch ({args.batch}): both "
                        "frameworks drop the last partial batch, so nothing would train",
                        "--limit", f"Pass --limit {args.batch} or more (or no --limit: all "
                        "54,000 training images)")


def td_python(venv: Path) -> Path:
    """The torchdistill venv's python, created or repaired to the pins (never .venv)."""
    py = venv / "bin" / "python"
    probe = ("import torch, torchvision, torchdistill; "
             "print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0], "
             "torchdistill.__version__)")
    want = [p.split("==")[1] for p in PINS]
    if py.exists():
        done = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split() == want:
            return py
    print(f"installing {' '.join(PINS)} into {venv} (once; a few minutes)", flush=True)
    # the interpreter .venv was made from: the same Python, so the same torch wheel
    base = getattr(sys, "_base_executable", None) or "python3"
    steps = ([[base, "-m", "venv", str(venv)]] if not py.exists() else []) + [
        [str(py), "-m", "pip", "install", "-q", *PINS]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"Installing torchdistill failed: `{' '.join(cmd)}` exited "
                            f"{done.returncode}: {_tail(done.stderr or done.stdout)}",
                            "--td-venv", f"Check that PyPI is reachable, then rerun (or delete "
                            f"{venv} and rerun); torch/torchvision must be the versions on this "
                            "machine's disk")
    return py


def _tail(text: str, n: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-n:]


def distill(overrides: list[str], run_dir: Path, env: dict, ok_codes=(0,)) -> dict:
    """One `distill` run in a fresh process; its summary.json."""
    done = subprocess.run([str(Path(sys.executable).parent / "distill"), *overrides,
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True, text=True)
    summary = read_json(run_dir / "summary.json")
    if done.returncode not in ok_codes or summary is None:
        raise UserError(f"`distill {' '.join(overrides)}` exited {done.returncode}: "
                        f"{_tail(done.stderr)}", None, f"Run it by hand to see the whole "
                        f"output (run dir {run_dir})")
    return summary


def epoch_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if keys.TRAIN_IMAGES_PER_S in r]


def overall_ips(per_epoch: list[float]) -> float:
    """Images / seconds over all epochs. Every epoch has the same number of images, so this is
    the harmonic mean of the per-epoch throughputs (for both frameworks alike)."""
    return len(per_epoch) / sum(1.0 / v for v in per_epoch)


def export_inputs(work: Path, job: list[str], summary: dict) -> None:
    """fashion_mnist.pt: the runner's own train/val/test arrays for this job; teacher.pt: the
    teacher store's weights ({"model": state_dict}, what torchdistill's load_ckpt reads)."""
    import torch
    from hydra import compose, initialize_config_dir

    from distill_cli.config.build import build_data
    from distill_cli.config.paths import CONF_DIR
    from distill_cli.runs import checkpoint

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=job)
    data = build_data(cfg.dataset)
    blob = {name: {"x": part.x.contiguous(), "y": part.y.contiguous()}
            for name, part in (("train", data.train), ("val", data.val), ("test", data.test))}
    blob.update(mean=list(data.train.mean), std=list(data.train.std))
    torch.save(blob, work / "fashion_mnist.pt")
    ckpt = checkpoint.load(Path(summary[keys.TEACHER_STORE_DIR]) / "checkpoints" / "best.pt",
                           "teacher")
    torch.save({"model": ckpt["model"]}, work / "teacher.pt")


def torchdistill_run(py: Path, work: Path, args, channels_last: bool, env: dict) -> dict:
    result = work / f"td-{time.monotonic_ns()}.json"
    cmd = [str(py), str(TD_DIR / "run_td.py"), "--config", str(TD_DIR / "fmnist_kd.yaml"),
           "--result", str(result), "--epochs", str(args.epochs), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--channels-last"] if channels_last else [])
    # distill_cli.models (the zoo) is imported from the checkout; fmnist_td from TD_DIR
    td_env = {**env, "PYTHONPATH": os.pathsep.join([str(TD_DIR), str(REPO)])}
    done = subprocess.run(cmd, cwd=work, env=td_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"The torchdistill run exited {done.returncode}: {_tail(done.stderr)}",
                        None, f"Run it by hand: cd {work} && PYTHONPATH={td_env['PYTHONPATH']} "
                        f"{' '.join(cmd)}")
    return json.loads(result.read_text())


def git_revision() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None,
                    help="training images (default: all 54,000); for development runs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of every run (default: every core)")
    ap.add_argument("--reps", type=int, default=1,
                    help="repetitions, the variants interleaved in each (medians)")
    ap.add_argument("--td-venv", type=Path, default=TD_VENV)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/torchdistill.md")
    args = ap.parse_args()
    check_args(args)
    py = td_python(args.td_venv)

    work = Path(tempfile.mkdtemp(prefix="bench-torchdistill-"))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    job = JOB + [f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch}",
                 f"trainer.threads={args.threads}"]
    if args.limit is not None:   # a small view; evaluation shrinks with it
        job += [f"dataset.limit_train={args.limit}",
                f"dataset.limit_eval={min(args.limit, 2000)}"]

    # Untimed preparation, per memory format: one step of stored KD trains the teacher in the
    # store (first time only) and builds its output table (keyed by format), so every timed
    # run below starts warm. trainer.stop_at_step ends such a run with exit code 3.
    prep = {}
    for fmt, flag in FORMATS.items():
        print(f"preparing ({fmt}): teacher store + stored outputs", flush=True)
        prep[fmt] = distill(job + OURS["ours KD stored"] + [
            f"trainer.channels_last={flag}", "trainer.stop_at_step=1"],
            work / f"prep-{flag}", env, ok_codes=(3,))
    export_inputs(work, job, prep["NCHW"])

    names = [TD, *OURS]
    ips = {(fmt, n): [] for fmt in FORMATS for n in names}
    acc = {}   # (fmt, name) -> (teacher test acc1, student val acc1) of the last repetition
    for rep in range(args.reps):
        for fmt, flag in FORMATS.items():
            print(f"rep {rep + 1}/{args.reps}, {fmt}: {TD}", flush=True)
            td = torchdistill_run(py, work, args, flag == "auto", env)
            ips[fmt, TD].append(overall_ips(td["epoch_images_per_s"]))
            acc[fmt, TD] = (td["teacher_test_acc1"], td["student_val_acc1"])
            for name, extra in OURS.items():
                print(f"rep {rep + 1}/{args.reps}, {fmt}: {name}", flush=True)
                rd = work / f"{name.replace(' ', '-')}-{flag}-{rep}"
                summary = distill(job + extra + [f"trainer.channels_last={flag}"], rd, env)
                rows = epoch_rows(rd)
                ips[fmt, name].append(overall_ips([r[keys.TRAIN_IMAGES_PER_S] for r in rows]))
                acc[fmt, name] = (summary.get(keys.TEACHER_TEST_ACC1),
                                   rows[-1].get(keys.join(keys.VAL, "acc1")))
                check_setting(name, fmt, "channels_last", summary.get(keys.CHANNELS_LAST),
                              flag == "auto")
                check_setting(name, fmt, "threads", summary.get(keys.THREADS), args.threads)
            check_setting(TD, fmt, "threads", td["threads"], args.threads)
            check_same_teacher(acc[fmt, "ours KD live"][0], acc[fmt, TD][0])
    med = {k: statistics.median(v) for k, v in ips.items()}
    text = report(args, med, acc, td["versions"], prep["NCHW"])
    atomic_write_bytes(args.out, lambda fh: fh.write(text.encode()))
    print(text)
    shutil.rmtree(work, ignore_errors=True)   # kept when anything above failed, to look into


def check_setting(name: str, fmt: str, what: str, got, want) -> None:
    """A run reports what it really used; a measurement under other settings is no result."""
    if got != want:
        raise RuntimeError(f"{name} ({fmt}) ran with {what}={got}, not {want}")


def check_same_teacher(ours: float | None, td: float) -> None:
    """The same teacher weights on both sides give the same test accuracy. The runner folds
    the frozen teacher's BatchNorm and torchdistill does not: float rounding may flip a rare
    sample (0.01 points each on 10,000 test images), hence the small tolerance."""
    if ours is None or abs(ours - td) > 0.05:
        raise RuntimeError(f"teacher test acc1 differs: runner {ours}, torchdistill {td}: the "
                           "torchdistill job did not run the runner's teacher on the same data")


def report(args, med: dict, acc: dict, versions: dict, prep: dict) -> str:
    cpu = provenance.cpu_model()
    n_train = args.limit or 54000
    cols = list(FORMATS)
    lines = [
        "# Side by side with torchdistill (Fashion-MNIST, `cnn` teacher -> `cnn_small`, KD)", "",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {cpu}, "
        f"{os.cpu_count()} cores; torch threads per run: {args.threads}; one process each",
        f"- versions: torchdistill {versions['torchdistill']} (torch {versions['torch']}, "
        f"torchvision {versions['torchvision']}, in {args.td_venv.name}); distill_cli at "
        f"{git_revision()} (same torch); Python {platform.python_version()}",
        f"- job: {n_train:,} training images, batch {args.batch} (last partial batch dropped), "
        f"epochs: {args.epochs}; SGD lr 0.1 momentum 0.9 nesterov wd 5e-4 constant, KD T 4, "
        f"0.1 CE + 0.9 T² KL; the teacher from the runner's teacher store "
        f"({prep.get(keys.TEACHER_STORE_DIR)}), loaded into the same module in both",
        f"- images/s = training images / seconds of the epochs' batch loops, over all epochs "
        f"(no start-up, no evaluation); repetitions: {args.reps} (medians)", "",
        "| variant | " + " | ".join(f"{c} images/s" for c in cols) + " |",
        "|---|" + "---:|" * len(cols)]
    for name in [TD, *OURS]:
        lines.append(f"| {name} | " + " | ".join(f"{med[c, name]:,.0f}" for c in cols) + " |")
    lines += ["", "| ours ÷ torchdistill KD (images/s) | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for name in OURS:
        lines.append(f"| {name} | " + " | ".join(f"{med[c, name] / med[c, TD]:.2f}"
                                                  for c in cols) + " |")
    lines += ["", "| NHWC ÷ NCHW (images/s) | ratio |", "|---|---:|"]
    for name in [TD, *OURS]:
        lines.append(f"| {name} | {med[cols[1], name] / med[cols[0], name]:.2f} |")
    lines += ["", "Same job on both sides (last repetition): the teacher's test acc1 and the "
              "student's val acc1 after the last epoch.", "",
              "| variant | format | teacher test acc1 | student val acc1 |", "|---|---|---:|---:|"]
    for (fmt, name), (t, s) in acc.items():
        lines.append(f"| {name} | {fmt} | {_pct(t)} | {_pct(s)} |")
    lines += ["", "Notes:",
              "- torchdistill reads batches through a DataLoader (one `__getitem__` per image, "
              "collate, its wrapper's supplementary dict) from a Dataset normalised once; the "
              "runner slices whole batches from in-memory uint8 tensors.",
              "- The teacher is in eval mode on both sides (torchdistill leaves the mode to the "
              "script; run_td.py sets it). The runner also folds the frozen teacher's BatchNorm "
              "into its convolutions (teachers/resolve.py); torchdistill runs it as loaded.",
              "- torchdistill has no memory-format option: in the channels_last column run_td.py "
              "converts both models and every batch to NHWC, what trainer.channels_last=auto "
              "does in the runner.", ""]
    return "\n".join(lines)


def _pct(v) -> str:
    return "—" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err.paragraph()}", file=sys.stderr)
        sys.exit(err.exit_code)
