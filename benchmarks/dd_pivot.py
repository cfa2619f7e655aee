"""The method x IPC table of a dataset-distillation table run (benchmarks/dd_table.sh's layout:
`<out>/<method>/ipc<N>/s<seed>/summary.json`): mean ± std over seeds of the test accuracy of
the best set (`best/test/acc1`, itself the mean over the protocol's evaluation networks), the
number of seeds where fewer than the most, and the mean wall seconds a run.

    python benchmarks/dd_pivot.py /tmp/ddtable_dd_fmnist_cpu
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def cells(out: Path) -> dict:
    got: dict = {}
    for path in sorted(out.glob("*/ipc*/s*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("status") != "finished":
            continue
        method, ipc = path.parts[-4], int(path.parts[-3][3:])
        got.setdefault(method, {}).setdefault(ipc, []).append(
            (summary["best/test/acc1"], summary.get("wall_s", float("nan"))))
    return got


def table(got: dict) -> str:
    ipcs = sorted({ipc for per in got.values() for ipc in per})
    most = max((len(runs) for per in got.values() for runs in per.values()), default=0)
    lines = ["| set | " + " | ".join(f"IPC {i}" for i in ipcs) + " | wall s a run |",
             "|---|" + "---:|" * (len(ipcs) + 1)]
    order = ["real", "dm", "datadam", "dc", "dsa", "mtt", "sre2l", "cda"]
    for method in sorted(got, key=lambda m: (order.index(m) if m in order else len(order), m)):
        per = got[method]
        row, walls = [], []
        for ipc in ipcs:
            runs = per.get(ipc, [])
            if not runs:
                row.append("—")
                continue
            acc = [a for a, _ in runs]
            text = f"{statistics.mean(acc):.2f}"
            if len(acc) > 1:
                text += f" ± {statistics.stdev(acc):.2f}"
            if len(acc) < most:
                text += f" (n={len(acc)})"
            row.append(text)
            walls.append(f"{statistics.mean(w for _, w in runs):.0f}")
        lines.append(f"| {method} | " + " | ".join(row) + f" | {' / '.join(walls)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(cells(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ddtable"))))
