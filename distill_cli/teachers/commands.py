"""`distill-teachers list|prune`: what the teacher store holds, and cleaning it."""
from __future__ import annotations

import shutil
from pathlib import Path

from distill_cli.errors import UserError
from distill_cli.teachers.store import Store


def list_stored(root: str | Path):
    """A rich table of complete entries (newest last) and the count of unfinished builds."""
    from rich.table import Table

    store = Store(root, "teachers")
    table = Table(title=f"teacher store: {store.dir}")
    for col in ("key", "arch", "dataset", "test acc1", "epochs", "seed", "size", "created"):
        table.add_column(col, justify="right" if col in ("test acc1", "size") else "left")
    entries = sorted(store.entries(), key=lambda m: m.get("created", ""))
    for m in entries:
        desc = m.get("description", {})
        table.add_row(m["key"], m["arch"], m["dataset"], f"{m['test_acc1']:.2f}",
                      str(desc.get("train", {}).get("epochs", "")), str(desc.get("seed", "")),
                      f"{m['size_bytes'] / 2**20:.1f} MiB", m["created"])
    return table, entries, store.leftovers()


def prune_stored(root: str | Path, keys: list[str], everything: bool) -> list[str]:
    """Remove unfinished builds always; plus the named entries, or all with `everything`."""
    store = Store(root, "teachers")
    removed = []
    for path in store.leftovers():
        key = path.name.split("-")[1] if path.name.startswith(".tmp-") else path.name
        with store.lock(key):  # never delete a build that is running right now
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    known = {m["key"] for m in store.entries()}
    for key in sorted(known if everything else set(keys)):
        if key not in known:
            raise UserError(f"No stored teacher with key {key}", "key",
                            "Run `distill-teachers list` to see the keys")
        store.remove(key)
        removed.append(key)
    return removed
