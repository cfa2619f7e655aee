"""`distill-report`: one row per configuration of a sweep, seeds pooled.

Input is what runs leave on disk: `summary.json` (and `.hydra/overrides.yaml` for runs that
died before writing it). Only finished runs enter the statistics; every other run is counted
in the `status` column, so a crashed seed can neither vanish nor skew a mean unnoticed.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml  # PyYAML comes with omegaconf

from distill_cli import keys
from distill_cli.errors import UserError
from distill_cli.reporting.tracking import make_console
from distill_cli.io import read_json
from distill_cli.tasks.agent.columns import REPORT_COLUMNS as AGENT_COLUMNS
from distill_cli.tasks.agent.columns import SUCCESS
from distill_cli.tasks.classification.columns import REPORT_COLUMNS
from distill_cli.tasks.dataset_distill.columns import REPORT_COLUMNS as SET_COLUMNS
from distill_cli.tasks.diffusion.columns import MAIN_METRIC as GEN_METRIC
from distill_cli.tasks.diffusion.columns import REPORT_COLUMNS as GEN_COLUMNS
from distill_cli.tasks.diffusion.columns import STEP_KEY
from distill_cli.tasks.lm.columns import REPORT_COLUMNS as LM_COLUMNS

MAIN_METRIC = keys.BEST_TEST_ACC1
FORMATS = ("table", "md", "csv", "json")
# Keys that identify what was trained even when the overrides agree (e.g. other defaults).
IDENTITY = (keys.DATASET, keys.STUDENT, keys.TEACHER_ARCH, keys.LOSS)
# Overrides naming a location, not a configuration: they differ per job (a per-seed teacher
# checkpoint, hydra.run.dir, trainer.resume) and must neither split a group nor label it.
_PATH_KEY = re.compile(r"(^|[._])(dir|path|root|file|checkpoint|resume)$")
_LOWER_IS_BETTER = ("ece", "nll", "wall", "ppl", "token_kl", "/fd", "/kid", "/class_fd")
_TEXT = ("config", keys.STATUS)
# column headers: the task's (one home for them); a column not named there shows its key
SHORT = {**REPORT_COLUMNS, **SET_COLUMNS, **LM_COLUMNS, **GEN_COLUMNS, **AGENT_COLUMNS,
         "best/test/acc1": "best acc1"}
ALIASES = {"best": keys.BEST_TEST_ACC1, "last": keys.LAST_TEST_ACC1, "ece": keys.BEST_TEST_ECE,
           "teacher": keys.TEACHER_TEST_ACC1, "wall": keys.WALL_S,
           "pgd": keys.BEST_TEST_PGD_ACC1}
# reported as mean ± std when any run has them (robust accuracy: `eval.pgd.steps > 0`)
# and the spread over a dataset-distillation run's evaluation networks
# and a language model's perplexity, agreement with and token KL to its teacher
# and a generator's sample quality: FD at its own steps and at each step count, KID, recall,
# class coverage and accuracy
OPTIONAL = (keys.BEST_TEST_PGD_ACC1, keys.BEST_TEST_MODEL_STD, "best/test/ppl",
            "best/test/agreement", "best/test/token_kl",
            *(k for k in GEN_COLUMNS if k != keys.WALL_S),
            *(k for k in AGENT_COLUMNS if k != keys.WALL_S))


@dataclass
class Run:
    path: Path
    status: str               # summary's status, or "missing" (no readable summary.json)
    summary: dict | None
    overrides: list[str]


@dataclass
class Group:
    label: str
    overrides: dict[str, str]  # the config-defining overrides (no seed, no paths)
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.status == "finished"]

    def info(self, key: str):
        return next((r.summary.get(key) for r in self.runs if r.summary), None)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v) -> bool:  # a number that can be ranked and plotted
    return _number(v) and math.isfinite(v)


# --------------------------------------------------------------------------- collect
def _load(run_dir: Path) -> Run:
    summary = read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    overrides = (summary or {}).get(keys.OVERRIDES)
    if overrides is None:  # no summary: the job's own record of its command line
        try:
            overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError):
            overrides = None
    status = str(summary.get(keys.STATUS) or "unknown") if summary else "missing"
    overrides = overrides if isinstance(overrides, list) else []
    return Run(run_dir, status, summary, [str(o) for o in overrides])


def collect(paths) -> list[Run]:
    """Every run dir (holds `summary.json` or `.hydra/`) under `paths`, each once."""
    found: dict[Path, Run] = {}
    for root in map(Path, paths):
        if root.name == "summary.json" and root.is_file():
            root = root.parent
        if not root.is_dir():
            raise UserError(f"{root} is not a directory", fix="Pass run dirs or sweep dirs "
                            "such as multirun/<date>/<time>")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if "summary.json" in filenames or ".hydra" in dirnames:
                found.setdefault(here.resolve(), _load(here))
                dirnames[:] = []  # runs never nest; skip checkpoints/, wandb/
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found.values(), key=lambda r: str(r.path))


# --------------------------------------------------------------------------- group
def _config(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.lstrip("~+").partition("=")
        hydra = key == "hydra" or key.startswith(("hydra.", "hydra/"))
        if not (key == "seed" or hydra or _PATH_KEY.search(key)
                or value.startswith(("/", "~", "./", "../"))):
            out[key] = _canonical(value)
    return out


def _canonical(value: str) -> str:
    """One spelling per value as Hydra reads it, so that sweeps written by hand (`true`,
    `0.001`) and by the multirun sweeper (`True`, `1e-3`) pool into one group and label."""
    low = value.lower()
    if low in ("true", "false", "null"):
        return low
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def group(runs: list[Run]) -> list[Group]:
    """Runs that differ only in seed (and paths) form one group."""
    buckets: dict[tuple, list[Run]] = {}
    # Runs with a summary first, so that a `missing` run joins the group of its config.
    for run in sorted(runs, key=lambda r: r.summary is None):
        cfg = tuple(sorted(_config(run.overrides).items()))
        if run.summary is not None:
            key = (cfg, tuple(str(run.summary.get(k)) for k in IDENTITY))
        else:
            same = [k for k in buckets if k[0] == cfg]
            key = same[0] if len(same) == 1 else (cfg, None)
        buckets.setdefault(key, []).append(run)
    configs = [_config(r.overrides) for r in runs]
    names = {k for c in configs for k in c}
    varying = sorted(k for k in names if len({c.get(k) for c in configs}) > 1)
    groups, seen = [], Counter()
    for (cfg, _), members in buckets.items():
        cfg = dict(cfg)
        label = " ".join(f"{k}={cfg[k]}" for k in varying if k in cfg)
        label = label or next((str(r.summary[keys.LOSS]) for r in members
                               if r.summary and r.summary.get(keys.LOSS)), "(defaults)")
        seen[label] += 1  # same overrides, different identity (e.g. other code defaults)
        groups.append(Group(label + (f" #{seen[label]}" if seen[label] > 1 else ""),
                            cfg, members))
    return groups


# --------------------------------------------------------------------------- statistics
def _values(runs: list[Run], key: str) -> list[float]:
    return [r.summary[key] for r in runs if _number(r.summary.get(key))]


def _mean(runs: list[Run], key: str) -> float | None:
    return statistics.mean(v) if (v := _values(runs, key)) else None


def _baseline(g: Group, groups: list[Group]) -> Group | None:
    """The CE group of the same student and dataset; if several (e.g. an lr sweep), the one
    sharing the most overrides with `g`; a tie gives no baseline rather than a guess."""
    cands = [c for c in groups if c.finished and c.info(keys.LOSS) == "CrossEntropy"
             and (c.info(keys.STUDENT), c.info(keys.DATASET)) == (g.info(keys.STUDENT),
                                                                  g.info(keys.DATASET))]
    if not cands:
        return None
    score = {id(c): len(set(c.overrides.items()) & set(g.overrides.items())) for c in cands}
    top = [c for c in cands if score[id(c)] == max(score.values())]
    return top[0] if len(top) == 1 else None


def step_keys(groups: list[Group]) -> list[str]:
    """A generator's FD per step count (`best/test/fd@<steps>`), fewest steps first."""
    found = {k for g in groups for r in g.finished for k in r.summary if STEP_KEY.match(k)}
    return sorted(found, key=lambda k: int(STEP_KEY.match(k).group(1)))


def summarize(groups: list[Group], metric: str = MAIN_METRIC) -> list[dict]:
    """One dict per group; numbers at full precision, None where there is no value."""
    rows = []
    steps = step_keys(groups)
    for g in groups:
        fin = g.finished
        row = {"config": g.label, **{k: g.info(k) for k in IDENTITY}, "n": len(fin)}
        for key in dict.fromkeys([metric, keys.BEST_TEST_ACC1, keys.LAST_TEST_ACC1, *OPTIONAL,
                                  *steps]):
            v = _values(fin, key)
            row[key] = statistics.mean(v) if v else None
            row[key + "_std"] = statistics.stdev(v) if len(v) > 1 else None
        base = _baseline(g, groups)
        base_mean = _mean(base.finished, metric) if base else None
        row[keys.GAIN] = (row[metric] - base_mean
                          if row[metric] is not None and base_mean is not None else None)
        for key in (keys.BEST_TEST_ECE, keys.TEACHER_TEST_ACC1, keys.WALL_S):
            row.setdefault(key, _mean(fin, key))
        row["seeds"] = sorted(r.summary.get(keys.SEED) for r in fin
                              if isinstance(r.summary.get(keys.SEED), int))
        others = Counter(r.status for r in g.runs if r.status != "finished")
        # Same config and seed twice (a sweep launched again): pooled, but said so.
        others["repeated seed"] = len(row["seeds"]) - len(set(row["seeds"]))
        row[keys.STATUS] = ", ".join(f"{n} {s}" for s, n in sorted(others.items()) if n) or "ok"
        row["runs"] = {str(r.path): r.status for r in g.runs}
        rows.append(row)
    return rows


def sort_rows(rows: list[dict], column: str, reverse: bool = False) -> list[dict]:
    """Best first: descending, except text and lower-is-better columns; blanks last."""
    column = ALIASES.get(column, column)
    if rows and column not in rows[0]:
        names = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
        raise UserError(f"--sort {column}: no such column",
                        fix="Choose one of: " + ", ".join(names))
    has = [r for r in rows if _num(r[column]) or isinstance(r[column], str)]
    text = any(isinstance(r[column], str) for r in has)
    descending = not text and not any(s in column for s in _LOWER_IS_BETTER)
    has.sort(key=lambda r: r[column], reverse=descending != reverse)
    return has + [r for r in rows if r not in has]


# --------------------------------------------------------------------------- output
def _columns(metric: str, rows: list[dict]) -> list[str]:
    optional = [k for k in (*OPTIONAL, *sorted(
        {k for r in rows for k in r if STEP_KEY.match(k) and not k.endswith("_std")},
        key=lambda k: int(STEP_KEY.match(k).group(1))))
        if any(r.get(k) is not None for r in rows)]
    # a column no row has a value for is left out (a generator's or an LM's report has no acc1,
    # ECE or gain vs CE); the ranked metric always shows
    shown = [k for k in (keys.BEST_TEST_ACC1, keys.LAST_TEST_ACC1, *optional, keys.BEST_TEST_ECE,
                         keys.GAIN, keys.TEACHER_TEST_ACC1, keys.WALL_S)
             if any(r.get(k) is not None for r in rows)]
    return ["config", "n", *dict.fromkeys([metric, *shown]), keys.STATUS]


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None or isinstance(v, str) or key == "n":
        return "" if v is None else str(v)
    if key == keys.GAIN:
        return f"{v:+.2f}"
    if "ece" in key:
        return f"{v:.4f}"
    if key == keys.WALL_S:
        return f"{v:.0f}"
    std = row.get(key + "_std")
    digits = 4 if "/kid" in key else 2   # KID is small (thousandths) in classifier features
    return f"{v:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{v:.{digits}f}"


def render(rows: list[dict], fmt: str, metric: str = MAIN_METRIC) -> str:
    """md / csv / json text (the rich table is `print_table`)."""
    if fmt == "json":  # strict JSON: a NaN metric becomes null
        return json.dumps([{k: v if not _number(v) or _num(v) else None for k, v in r.items()}
                           for r in rows], indent=2)
    if fmt == "csv":
        buf, names = io.StringIO(), [k for k in rows[0] if k not in ("seeds", "runs")]
        writer = csv.DictWriter(buf, names, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    cols = _columns(metric, rows)
    lines = ["| " + " | ".join(SHORT.get(c, c) for c in cols) + " |",
             "|" + "|".join("---" if c in _TEXT else "---:" for c in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r, c).replace("|", "\\|") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], metric: str = MAIN_METRIC, title: str | None = None) -> None:
    from rich.table import Table

    table, cols = Table(title=title), _columns(metric, rows)
    for c in cols:
        table.add_column(SHORT.get(c, c), justify="left" if c in _TEXT else "right")
    for r in rows:
        table.add_row(*(_cell(r, c) for c in cols),
                      style=None if r[keys.STATUS] == "ok" else "yellow")
    # A pipe gets a wide console: rich's 80-column default would fold the numbers.
    make_console().print(table)


def plot(rows: list[dict], out: Path, metric: str = MAIN_METRIC) -> None:
    """Bar per group (mean ± std of `metric`); each CE baseline as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if _num(r[metric])]
    if not rows:
        raise UserError(f"--plot: no finished run has {metric}")
    means = [r[metric] for r in rows]
    stds = [r[metric + "_std"] or 0.0 for r in rows]
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 3), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=30, ha="right")
    ce = {(r[keys.STUDENT], r[keys.DATASET]): r[metric] for r in rows
          if r[keys.LOSS] == "CrossEntropy"}
    for i, ((student, _), value) in enumerate(ce.items()):
        ax.axhline(value, ls="--", color=f"C{i + 1}", lw=1.2, label=f"CE baseline, {student}")
    if ce:
        ax.legend(loc="best", fontsize="small")
    # Zoom on the spread: differences of a fraction of a point vanish on a 0-100 axis.
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    pad = max(0.5 * (hi - lo), 0.5)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean ± std over seeds")
    fig.savefig(out, dpi=120)


GRID_FILES = ("samples_best.png", "grid_best.png")   # a generator's samples, a synthetic set


def grids(rows: list[dict], out: Path) -> None:
    """Each configuration's picture side by side (its first finished run's `samples_best.png`
    or `grid_best.png`), titled with the configuration, in the table's order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    found = []
    for r in rows:
        runs = sorted(p for p, status in r["runs"].items() if status == "finished")
        png = next((Path(p) / f for p in runs for f in GRID_FILES if (Path(p) / f).is_file()),
                   None)
        if png is not None:
            found.append((r["config"], png))
    if not found:
        raise UserError("--grids: no finished run holds samples_best.png or grid_best.png",
                        "--grids", "Pass diffusion or dataset-distillation runs")
    cols = min(3, len(found))
    rows_n = -(-len(found) // cols)
    fig = Figure(figsize=(5.0 * cols, 5.0 * rows_n), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (label, png) in enumerate(found):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        ax.imshow(imread(png))
        ax.set_title(label, fontsize="small")
        ax.axis("off")
    fig.savefig(out, dpi=120)


def machines_note(runs: list[Run]) -> str:
    """A warning when finished runs come from more than one kind of machine (summary
    `machine`): their last bits, and so single runs' numbers, differ by machine, whatever the
    code (README, The main job). "" for one kind, or runs written before summaries held it."""
    kinds = Counter(r.summary[keys.MACHINE] for r in runs
                    if isinstance(r.summary.get(keys.MACHINE), str))
    if len(kinds) < 2:
        return ""
    listed = "; ".join(f"{n} on {kind}" for kind, n in kinds.most_common())
    return (f"note: these runs ran on {len(kinds)} kinds of machine ({listed}); the same config "
            "and seed give other numbers on another kind, so compare means over seeds, or "
            "rerun on one kind")


def report(paths, metric: str = MAIN_METRIC, sort: str | None = None, reverse: bool = False,
           fmt: str = "table", plot_to: Path | None = None,
           grids_to: Path | None = None) -> list[dict]:
    """What `distill-report` does; raises UserError for anything the user should fix."""
    runs = collect(paths)
    if not runs:
        raise UserError("no run found under " + ", ".join(map(str, paths)), fix="Pass a "
                        "sweep dir (multirun/<date>/<time>) or run dirs holding summary.json")
    finished = [r for r in runs if r.status == "finished"]
    if metric == MAIN_METRIC and finished and all(
            r.summary.get(keys.TASK) == "diffusion" for r in finished):
        metric = GEN_METRIC   # a generator has no accuracy: ranked by FD (lower is better)
    elif metric == MAIN_METRIC and finished and all(
            r.summary.get(keys.TASK) == "agent" for r in finished):
        metric = SUCCESS      # an agent is ranked by its tool-using success, not token accuracy
    if finished and not _values(finished, metric):
        numeric = sorted({k for r in finished for k, v in r.summary.items() if _num(v)})
        raise UserError(f"--metric {metric}: no finished run has it",
                        fix="Numeric keys of summary.json: " + ", ".join(numeric))
    rows = sort_rows(summarize(group(runs), metric), sort or metric, reverse)
    if fmt == "table":
        print_table(rows, metric, title=f"{len(runs)} runs, {len(rows)} configs")
    else:
        print(render(rows, fmt, metric), end="")
    note = machines_note(finished)
    if note:   # on stderr: a md / csv / json table on stdout stays parseable
        print(note, file=sys.stderr)
    if plot_to is not None:
        plot(rows, Path(plot_to), metric)
    if grids_to is not None:
        grids(rows, Path(grids_to))
    return rows
