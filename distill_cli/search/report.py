"""How a `distill-search` result is shown: the rich table on the console and `search.md` /
`search.json` in the run dir (the result dict is built by distill_cli/search.py)."""
from __future__ import annotations

from pathlib import Path

from distill_cli import keys
from distill_cli.reporting.tracking import ConsoleReporter
from distill_cli.io import atomic_write_bytes, write_json


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_rows(result: dict) -> list[list[str]]:
    return [[str(r["rank"]), r["candidate"], f"{r['params']:,}", f"{r['macs']:,}",
             _fmt(r["d_sem"], ".4g"), _fmt(r["d_rel"], ".4g"), f"{r['score']:.5g}",
             f"{r[keys.WALL_S]:.2f}"] for r in result["rows"]]


HEADERS = ["rank", "candidate", "params", "FLOPs (MACs)", "D_sem", "D_rel", "score", "wall s"]


def print_table(result: dict, reporter: ConsoleReporter) -> None:
    from rich.table import Table

    t = result["teacher"]
    table = Table(title=f"DisWOT search · teacher {t['arch']} ({t['weights']} weights) · "
                        f"{result['dataset']} · batch {result['batch_size']}")
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "candidate" else "right")
    for row in table_rows(result):
        table.add_row(*row)
    reporter.console.print(table)
    if result["train"]:
        trained = Table(title="distilled top-k")
        for h in ("rank", "candidate", keys.BEST_TEST_ACC1, "status", "run dir"):
            trained.add_column(h)
        for r in result["train"]:
            trained.add_row(str(r["rank"]), r["candidate"], _fmt(r[keys.BEST_TEST_ACC1], ".2f"),
                            r[keys.STATUS], r[keys.RUN_DIR])
        reporter.console.print(trained)


def markdown(result: dict) -> str:
    t = result["teacher"]
    lines = [f"# DisWOT search: teacher {t['arch']} on {result['dataset']}", "",
             f"Teacher weights: {t['weights']}; one training batch of {result['batch_size']} "
             f"(seed {result['seed']}); terms: "
             + ", ".join(n for n, on in (("D_sem", result["semantic"]),
                                         ("D_rel", result["relation"])) if on)
             + ". Score = -(D_sem + D_rel), higher = more similar to the teacher.", ""]
    if result["note"]:
        lines += [result["note"] + ".", ""]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    if result["train"]:
        lines += ["", "## Distilled top-k", "",
                  f"| rank | candidate | {keys.BEST_TEST_ACC1} | status |", "|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['candidate']} | {_fmt(r[keys.BEST_TEST_ACC1], '.2f')} | "
                  f"{r[keys.STATUS]} |" for r in result["train"]]
    return "\n".join(lines) + "\n"


def write_result(run_dir: Path, result: dict) -> None:
    write_json(run_dir / "search.json", result)
    text = markdown(result).encode()
    atomic_write_bytes(run_dir / "search.md", lambda fh: fh.write(text))
