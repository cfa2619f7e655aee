"""Does the DisWOT score rank students the way distillation does? (METHODS.md "DisWOT")

For >= 6 Fashion-MNIST candidate students of the `fmnist_bench` teacher (`cnn`, 290k params,
penultimate width 128 — every candidate below ends at width 128, so both D_sem and D_rel apply):

1. `distill-search` scores every candidate at random init on one training batch
   (distill_cli/search.py) and distils EVERY candidate with KD (T 4, CE 0.1, KD 0.9) for a short
   schedule (`--epochs`, default 2), from the stored trained teacher;
2. a second, training-free pass scores them against the TRAINED teacher weights
   (`search.teacher_weights=trained`; the paper's protocol re-initialises the teacher too);
3. Spearman's rank correlation (distill_cli.evaluation.diswot.spearman: float64, ties averaged) between
   the KD test accuracy and each score, each term alone, and the param/MAC counts as the
   naive baselines; written to benchmarks/results/diswot_rank.md.

    python benchmarks/diswot_rank.py                     # the full benchmark (see --help)
    python benchmarks/diswot_rank.py --smoke --out /tmp/diswot_smoke.md   # digits, 2 candidates

Expected runtime on this project's 2-core CPU machine (no GPU), with the teacher already in the
store (the `fmnist_bench` teacher of benchmarks/results/fmnist_methods.md, same key; otherwise
its 5 epochs come first, a few minutes): scoring all 8 candidates takes seconds; the KD runs
dominate: 8 x 2 epochs of full Fashion-MNIST = 864k training images. Training throughput
measured here with the cores shared by other jobs: mlp ~1,600 img/s, cnn 8/16/32 ~560,
cnn 16/32/128 ~260, cnn 32/64/128 x2 convs ~80 img/s — about 50 min in all when shared, and
roughly 5-10x less on idle cores (the README's 10-epoch KD run of the 6.5k student takes ~70 s).
The digits smoke (`--smoke`, teacher store trains a resnet8 first) takes ~1 min.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from distill_cli.config.paths import CONF_DIR  # noqa: E402
from distill_cli.evaluation.diswot import spearman  # noqa: E402
from distill_cli.search.student_search import search  # noqa: E402

# Every candidate's last stage has 128 channels = the teacher's penultimate width.
CANDIDATES = [
    "{arch: cnn, channels: [8, 16, 128], convs_per_stage: 1}",     # 1.2M MACs
    "{arch: cnn, channels: [16, 32, 128], convs_per_stage: 1}",    # 2.8M
    "{arch: cnn, channels: [32, 64, 128], convs_per_stage: 1}",    # 7.5M
    "{arch: cnn, channels: [8, 16, 128], convs_per_stage: 2}",
    "{arch: cnn, channels: [16, 32, 128], convs_per_stage: 2}",    # 13.7M
    "{arch: mlp, hidden: [128]}",                                  # 0.1M
    "{arch: mlp, hidden: [512, 128]}",                             # 0.5M
    "{arch: mlp, hidden: [256, 256, 128]}",
]
# Left out for time: the teacher's own architecture (29M MACs) and wrn_16_2 (77M MACs) train
# ~3x / ~8x slower than cnn 16/32/128 on 2 CPU cores (measured: 79 / 33 vs 257 img/s).
FULL = ["recipe=fmnist_bench", "logger=none", "trainer.log_every_n_steps=100"]
SMOKE = ["dataset=digits", "teacher=resnet8", "logger=none", "trainer.batch_size=64",
         "trainer.log_every_n_steps=5", "scheduler=none", "optimizer.lr=0.05",
         "teacher.train.epochs=3", "teacher.train.batch_size=64"]
SMOKE_CANDIDATES = ["{arch: resnet8}", "{arch: cnn, channels: [8, 16, 64], convs_per_stage: 1}"]


def compose_search(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="search", overrides=overrides)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "diswot_rank.md"))
    p.add_argument("--run-dir", default=None, help="where the searches and KD runs go "
                   "(default: a fresh temporary dir)")
    p.add_argument("--epochs", type=int, default=2, help="KD epochs per candidate")
    p.add_argument("--seed", type=int, default=0, help="run seed = search seed")
    p.add_argument("--batch-size", type=int, default=64, help="the scoring batch")
    p.add_argument("--smoke", action="store_true", help="digits, 2 candidates, 1 epoch")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. "
                   "teacher.checkpoint=<best.pt> or dataset.limit_train=20000")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    base = SMOKE if args.smoke else FULL
    cands = SMOKE_CANDIDATES if args.smoke else CANDIDATES
    epochs = 1 if args.smoke else args.epochs
    common = base + [f"search.candidates=[{', '.join(cands)}]", f"seed={args.seed}",
                     f"search.batch_size={args.batch_size}", f"trainer.epochs={epochs}",
                     "search.semantic=true"] + args.overrides
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="diswot-rank-"))
    started = time.time()
    # 1. the paper's protocol (random teacher), then KD of every candidate
    ranked = search(compose_search(common + ["search.train=true", f"search.top_k={len(cands)}"]),
                    root / "random_teacher", tty=False)
    # 2. the same candidates against the trained teacher (no training)
    trained = search(compose_search(common + ["search.teacher_weights=trained"]),
                     root / "trained_teacher", tty=False)
    wall = time.time() - started

    acc = {r["candidate"]: r["best/test/acc1"] for r in ranked["train"]}
    rows = sorted(ranked["rows"], key=lambda r: r["index"])
    t_score = {r["candidate"]: r for r in trained["rows"]}
    names = [r["candidate"] for r in rows]
    y = [acc[n] for n in names]
    predictors = {
        "DisWOT score, random teacher (paper)": [r["score"] for r in rows],
        "DisWOT score, trained teacher": [t_score[n]["score"] for n in names],
        "-D_sem alone, random teacher": [-r["d_sem"] for r in rows],
        "-D_rel alone, random teacher": [-r["d_rel"] for r in rows],
        "-D_sem alone, trained teacher": [-t_score[n]["d_sem"] for n in names],
        "-D_rel alone, trained teacher": [-t_score[n]["d_rel"] for n in names],
        "params (baseline)": [r["params"] for r in rows],
        "MACs (baseline)": [r["macs"] for r in rows],
    }
    rho = {k: spearman(v, y) for k, v in predictors.items()}

    t = ranked["teacher"]
    lines = [
        "# DisWOT score vs distillation accuracy" + (" (digits smoke)" if args.smoke else ""),
        "",
        f"- command: `python benchmarks/diswot_rank.py {' '.join(argv or sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d')}; {wall / 60:.1f} min in all; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        f"- dataset {ranked['dataset']}; teacher `{t['arch']}` ({t['params']:,} params, "
        f"width {t['width']}, KD teacher test acc1 "
        f"{ranked['train'][0].get('teacher/test/acc1') or float('nan'):.2f}); each candidate "
        f"distilled with KD (T 4, CE 0.1, KD 0.9) for {epochs} epoch(s), seed {args.seed}",
        f"- scores on one training batch of {ranked['batch_size']} at Gaussian init "
        "(students always; the teacher re-initialised too in the paper's protocol)",
        "", "| candidate | params | MACs | D_sem | D_rel | score (random T) | "
        "score (trained T) | KD test acc1 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r, n in zip(rows, names):
        lines.append(f"| {n} | {r['params']:,} | {r['macs']:,} | {r['d_sem']:.4g} | "
                     f"{r['d_rel']:.4g} | {r['score']:.5g} | {t_score[n]['score']:.5g} | "
                     f"{acc[n]:.2f} |")
    lines += ["", f"Spearman rank correlation with the KD test accuracy (n = {len(rows)}; "
              "ties averaged; +1 = same order):", "", "| predictor | Spearman ρ |",
              "|---|---:|"]
    lines += [f"| {k} | {v:+.3f} |" for k, v in rho.items()]
    lines += ["", f"Run dirs: {root}", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
