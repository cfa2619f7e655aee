"""`distill-report` over sweep dirs laid out as `distill -m` leaves them: numbered job dirs
with `.hydra/overrides.yaml` and a `summary.json` written by json.dump (the real input)."""
from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from distill_cli.cli import report_main
from distill_cli.reporting.report import collect, group, summarize

REPORT = str(Path(sys.executable).parent / "distill-report")
LOSS = {"ce": "CrossEntropy", "kd": "KD"}

# (loss, student, seed, status, best acc1); last acc1 = best - 0.5, ece derived from acc.
JOBS = [("ce", "cnn_small", s, "finished", a) for s, a in [(0, 80.1), (1, 81.3), (2, 79.7)]] \
    + [("kd", "cnn_small", s, "finished", a) for s, a in [(0, 82.0), (1, 83.5), (2, 82.9)]] \
    + [("kd", "cnn_small", 3, "interrupted", 10.0), ("kd", "cnn_small", 4, "failed", 999.0),
       ("kd", "cnn_small", 5, "missing", None)] \
    + [("ce", "resnet8", s, "finished", a) for s, a in [(0, 85.0), (1, 86.2)]] \
    + [("kd", "resnet8", 0, "finished", 87.4)]


def write_job(job_dir: Path, overrides: list[str], summary: dict | None) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        with open(job_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)


def summary_for(loss, student, seed, status, acc, overrides, run_dir) -> dict:
    s = {"status": status, "seed": seed, "overrides": overrides, "run_dir": str(run_dir),
         "dataset": "fashion_mnist", "student": student, "loss": LOSS[loss], "git": "abc123",
         "teacher": "resnet20" if loss == "kd" else None, "epochs": 10, "best/epoch": 9,
         "best/val/acc1": acc, "best/test/acc1": acc, "best/test/acc5": 99.0,
         "best/test/nll": 0.4, "best/test/ece": (100 - acc) / 1000, "last/test/acc1": acc - 0.5,
         "wall_s": 100.0 + seed, "train/images_per_s": 5000.0}
    if loss == "kd":
        s.update({"teacher/test/acc1": 91.0 + 0.1 * seed, "best/test/agreement": 90.0})
    return s


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2024-05-01" / "10-00-00-000001"
    for num, (loss, student, seed, status, acc) in enumerate(JOBS):
        overrides = [f"loss={loss}", f"student={student}", f"seed={seed}"]
        if loss == "kd":  # a per-seed teacher checkpoint: a path, not a config
            overrides[1:1] = ["teacher=resnet20",
                              f"teacher.checkpoint=/ckpt/t{seed}/checkpoints/best.pt"]
        job = root / str(num)
        write_job(job, overrides, None if status == "missing" else
                  summary_for(loss, student, seed, status, acc, overrides, job))
    return root


def by_config(rows):
    return {r["config"]: r for r in rows}


def finished_accs(loss, student, key="best/test/acc1"):
    return [a - (0.5 if key.startswith("last") else 0) for ls, st, _, status, a in JOBS
            if (ls, st, status) == (loss, student, "finished")]


def run_cli(capsys, *args) -> str:
    report_main([*map(str, args)])
    return capsys.readouterr().out


def test_groups_pool_seeds_and_label_by_varying_overrides(sweep):
    runs = collect([sweep])
    assert len(runs) == len(JOBS)
    assert [r.status for r in runs].count("missing") == 1
    rows = by_config(summarize(group(runs)))
    # seed and teacher.checkpoint vary too but never split a group nor appear in its label
    assert set(rows) == {"loss=ce student=cnn_small", "loss=kd student=cnn_small "
                         "teacher=resnet20", "loss=ce student=resnet8",
                         "loss=kd student=resnet8 teacher=resnet20"}
    kd = rows["loss=kd student=cnn_small teacher=resnet20"]
    assert kd["n"] == 3 and kd["seeds"] == [0, 1, 2]
    assert kd["status"] == "1 failed, 1 interrupted, 1 missing"
    assert rows["loss=ce student=cnn_small"]["status"] == "ok"


def test_mean_std_and_gain_over_ce_use_finished_runs_only(sweep):
    rows = by_config(summarize(group(collect([sweep]))))
    kd = rows["loss=kd student=cnn_small teacher=resnet20"]
    best, last = finished_accs("kd", "cnn_small"), finished_accs("kd", "cnn_small", "last")
    # the interrupted (10.0) and failed (999.0) runs are not in these numbers
    assert kd["best/test/acc1"] == pytest.approx(statistics.mean(best), abs=1e-12)
    assert kd["best/test/acc1_std"] == pytest.approx(statistics.stdev(best), abs=1e-12)
    assert kd["last/test/acc1"] == pytest.approx(statistics.mean(last), abs=1e-12)
    assert kd["last/test/acc1_std"] == pytest.approx(statistics.stdev(last), abs=1e-12)
    assert kd["best/test/ece"] == pytest.approx(statistics.mean((100 - a) / 1000 for a in best))
    assert kd["teacher/test/acc1"] == pytest.approx(statistics.mean([91.0, 91.1, 91.2]))
    assert kd["wall_s"] == pytest.approx(101.0)
    ce = statistics.mean(finished_accs("ce", "cnn_small"))
    assert kd["gain"] == pytest.approx(statistics.mean(best) - ce)
    r8 = rows["loss=kd student=resnet8 teacher=resnet20"]  # its own student's baseline
    assert r8["gain"] == pytest.approx(87.4 - statistics.mean([85.0, 86.2]))
    assert r8["best/test/acc1_std"] is None  # one seed: no sample std
    assert rows["loss=ce student=resnet8"]["gain"] == 0.0
    assert rows["loss=ce student=resnet8"]["teacher/test/acc1"] is None


def test_gain_is_blank_without_a_ce_baseline(tmp_path):
    for seed in range(2):
        ov = ["loss=kd", "student=cnn_small", f"seed={seed}"]
        write_job(tmp_path / str(seed), ov,
                  summary_for("kd", "cnn_small", seed, "finished", 80.0 + seed, ov, tmp_path))
    (row,) = summarize(group(collect([tmp_path])))
    assert row["gain"] is None
    assert row["config"] == "KD"  # nothing but the seed varies: the loss names the group


def test_collect_accepts_a_run_dir_and_flags_unreadable_summaries(sweep):
    assert [r.status for r in collect([sweep / "0"])] == ["finished"]
    (sweep / "1" / "summary.json").write_text('{"status": "fini')  # torn / corrupt
    run = next(r for r in collect([sweep]) if r.path.name == "1")
    assert run.status == "missing" and run.overrides[0] == "loss=ce"  # from .hydra


def test_formats_parse(sweep, capsys):
    data = json.loads(run_cli(capsys, sweep, "--format", "json"))
    assert {d["config"] for d in data} >= {"loss=ce student=cnn_small"}
    kd = next(d for d in data if d["config"].startswith("loss=kd student=cnn_small"))
    assert kd["best/test/acc1"] == statistics.mean(finished_accs("kd", "cnn_small"))

    rows = list(csv.DictReader(io.StringIO(run_cli(capsys, sweep, "--format", "csv"))))
    assert len(rows) == 4 and float(rows[0]["best/test/acc1"]) == data[0]["best/test/acc1"]

    md = run_cli(capsys, sweep, "--format", "md").splitlines()
    assert md[0].startswith("| config |") and set(md[1]) <= set("|-: ")
    assert len(md) == 2 + 4 and "±" not in md[2] and "80.37 ± 0.83" in md[5]  # 1 vs 3 seeds

    table = run_cli(capsys, sweep)
    assert "loss=kd student=resnet8 teacher=resnet20" in table and "1 missing" in table


def test_sort(sweep, capsys):
    best = [d["config"] for d in json.loads(run_cli(capsys, sweep, "--format", "json"))]
    assert best == ["loss=kd student=resnet8 teacher=resnet20", "loss=ce student=resnet8",
                    "loss=kd student=cnn_small teacher=resnet20", "loss=ce student=cnn_small"]
    by_name = json.loads(run_cli(capsys, sweep, "--format", "json", "--sort", "config"))
    assert [d["config"] for d in by_name] == sorted(best)
    by_ece = json.loads(run_cli(capsys, sweep, "--format", "json", "--sort", "ece"))
    assert [d["best/test/ece"] for d in by_ece] == sorted(d["best/test/ece"] for d in by_ece)
    gain = json.loads(run_cli(capsys, sweep, "--format", "json", "--sort", "gain",
                              "--reverse"))
    assert [d["gain"] for d in gain] == sorted(d["gain"] for d in gain)  # worst first
    assert gain[-1]["config"] == "loss=kd student=cnn_small teacher=resnet20"
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, sweep, "--sort", "nope")
    assert exc.value.code == 2 and "no such column" in capsys.readouterr().err


def test_metric_option(sweep, capsys):
    data = json.loads(run_cli(capsys, sweep, "--format", "json", "--metric", "last/test/acc1"))
    assert data[0]["gain"] == pytest.approx(87.4 - 0.5 - statistics.mean([84.5, 85.7]))
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, sweep, "--metric", "best/test/acc9")
    assert exc.value.code == 2 and "best/test/acc5" in capsys.readouterr().err


def test_plot_writes_a_png(sweep, tmp_path, capsys):
    out = tmp_path / "acc.png"
    run_cli(capsys, sweep, "--format", "md", "--plot", out)
    assert out.stat().st_size > 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_dir_exits_2_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([REPORT, str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: no run found")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_second_sweep_pools_flags_repeats_and_ignores_launch_overrides(sweep, tmp_path):
    again = tmp_path / "multirun" / "2024-05-02" / "09-00-00-000001"
    for num, (seed, status) in enumerate([(0, "finished"), (7, "running")]):
        ov = ["hydra/launcher=joblib", "loss=ce", "student=cnn_small", f"seed={seed}",
              "trainer.resume=auto"]
        write_job(again / str(num), ov,
                  summary_for("ce", "cnn_small", seed, status, 70.0, ov, again))
    rows = by_config(summarize(group(collect([sweep, again, sweep / "0"]))))
    ce = rows["loss=ce student=cnn_small"]  # launcher/resume overrides: no new group
    assert ce["n"] == 4 and ce["seeds"] == [0, 0, 1, 2]
    assert ce["status"] == "1 repeated seed, 1 running"
    assert ce["best/test/acc1"] == pytest.approx(statistics.mean([80.1, 81.3, 79.7, 70.0]))


def test_robust_accuracy_column_only_when_measured(tmp_path, capsys):
    """`best/test/pgd_acc1` (eval.pgd) gets a mean ± std column; sweeps without it show none."""
    root = tmp_path / "sweep"
    for num, (loss, pgd) in enumerate([("adv_ce", 40.0), ("adv_ce", 44.0), ("ce", 2.0)]):
        overrides = [f"loss={loss}", f"seed={num}"]
        s = summary_for("ce", "resnet8", num, "finished", 80.0, overrides, root / str(num))
        s["loss"] = loss
        s["best/test/pgd_acc1"] = pgd
        write_job(root / str(num), overrides, s)
    out = run_cli(capsys, root, "--format", "md")
    header, _, *lines = out.strip().splitlines()
    assert "pgd acc1" in header
    row = next(line for line in lines if "loss=adv_ce" in line)
    assert f"42.00 ± {statistics.stdev([40.0, 44.0]):.2f}" in row
    rows = json.loads(run_cli(capsys, root, "--format", "json"))
    assert {r["config"]: r["best/test/pgd_acc1"] for r in rows}["loss=ce"] == 2.0
    assert "pgd acc1" not in run_cli(capsys, _plain_sweep(tmp_path), "--format", "md")


def _plain_sweep(tmp_path) -> Path:
    root = tmp_path / "plain"
    for num in range(2):
        overrides = [f"seed={num}"]
        write_job(root / str(num), overrides,
                  summary_for("ce", "resnet8", num, "finished", 80.0, overrides, root / str(num)))
    return root


def test_one_value_spelt_two_ways_is_one_group(tmp_path):
    """The multirun sweeper records `trainer.channels_last=True`, a hand-typed single run
    `=true`; `1e-3` and `0.001` are one float. Each pair is one config, labelled once."""
    root = tmp_path / "mixed"
    spellings = [("True", "1e-3"), ("true", "0.001"), ("TRUE", "0.0010"), ("false", "0.001")]
    for num, (flag, lr) in enumerate(spellings):
        overrides = ["loss=ce", f"trainer.channels_last={flag}", f"optimizer.lr={lr}",
                     f"seed={num}"]
        write_job(root / str(num), overrides, summary_for("ce", "resnet8", num, "finished",
                                                          80.0 + num, overrides, root / str(num)))
    rows = by_config(summarize(group(collect([root]))))
    assert set(rows) == {"trainer.channels_last=true", "trainer.channels_last=false"}
    assert rows["trainer.channels_last=true"]["n"] == 3
    assert rows["trainer.channels_last=true"]["seeds"] == [0, 1, 2]


def test_runs_from_several_kinds_of_machine_get_a_note_on_stderr(sweep, capsys):
    """Single runs' numbers differ by machine kind (the kernels' last bits): a table mixing
    kinds says so, on stderr, so that a md / csv / json table on stdout still parses."""
    run_cli(capsys, sweep, "--format", "md")
    assert "kinds of machine" not in capsys.readouterr().err   # no `machine` recorded: silent
    summaries = sorted(sweep.glob("*/summary.json"))
    for i, path in enumerate(summaries):
        summary = json.loads(path.read_text())
        summary["machine"] = "CPU A (AVX512), torch 2.14.1" if i % 3 else "CPU B (AVX2), torch 2.14.1"
        path.write_text(json.dumps(summary))
    report_main([str(sweep), "--format", "md"])
    out, err = capsys.readouterr()
    assert out.startswith("| config |") and "kinds of machine" not in out
    finished = [json.loads(p.read_text()) for p in summaries]
    a = sum(1 for i, s in enumerate(finished) if s["status"] == "finished" and i % 3)
    b = sum(1 for i, s in enumerate(finished) if s["status"] == "finished" and not i % 3)
    assert "2 kinds of machine (" in err and a and b
    assert f"{a} on CPU A (AVX512), torch 2.14.1" in err and f"{b} on CPU B (AVX2)" in err
    for path in summaries:   # one kind again: silent
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "machine": "CPU A (AVX512), torch 2.14.1"}))
    report_main([str(sweep), "--format", "md"])
    assert "kinds of machine" not in capsys.readouterr().err
