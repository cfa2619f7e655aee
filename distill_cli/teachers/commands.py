"""`distill-teachers list|prune`: what the teacher store holds, and cleaning it.

Neither creates anything: a store that does not exist lists as empty. A broken entry (its
entry.json unusable) is listed, marked, among the good ones, and `prune <key>` removes it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from distill_cli.errors import UserError
from distill_cli.teachers.build import score_text
from distill_cli.teachers.store import Store, prune_command


def _open(root: str | Path) -> Store:
    return Store(root, "teachers", create=False, root_key="--root")


def list_stored(root: str | Path):
    """A rich table of complete entries (newest last) then the broken ones, the good entries,
    and the unfinished builds."""
    from rich.table import Table

    store = _open(root)
    table = Table(title=f"teacher store: {store.dir}")
    for col in ("key", "arch", "dataset", "test score", "epochs", "seed", "size", "created"):
        table.add_column(col, justify="right" if col in ("test score", "size") else "left")
    entries = sorted(store.entries(), key=lambda m: m["created"])
    for m in entries:
        desc = m["description"]
        train = desc.get("train") if isinstance(desc.get("train"), dict) else {}
        table.add_row(m["key"], m["arch"], m["dataset"], score_text(m).removeprefix("test "),
                      str(train.get("epochs", "")), str(desc.get("seed", "")),
                      f"{m['size_bytes'] / 2**20:.1f} MiB", m["created"])
    broken = store.broken()
    for key, why in broken.items():
        table.add_row(key, "BROKEN", why, "", "", "", "", "")
    if broken:
        table.caption = (f"{len(broken)} broken entr{'y' if len(broken) == 1 else 'ies'}, never "
                         "used; remove with: " + "; ".join(prune_command(root, k) for k in broken))
    return table, entries, store.leftovers()


def prune_stored(root: str | Path, keys: list[str], everything: bool) -> list[str]:
    """Remove unfinished builds always; plus the named entries (broken ones too), or all with
    `everything`."""
    store = _open(root)
    removed = []
    for path in store.leftovers():
        key = path.name.split("-")[1] if path.name.startswith(".tmp-") else path.name
        with store.lock(key):  # never delete a build that is running right now
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    known = {m["key"] for m in store.entries()} | set(store.broken())
    for key in sorted(known if everything else set(keys)):
        if key not in known:
            raise UserError(f"No stored teacher with key {key}", "key",
                            "Run `distill-teachers list` to see the keys")
        store.remove(key)
        removed.append(key)
    return removed
