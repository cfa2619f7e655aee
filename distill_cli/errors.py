"""User-facing errors: one short paragraph (what, which config key, how to fix), exit code 2.

Anything a user can cause with a bad override, a missing file or unavailable data raises
`UserError`; the CLI prints it without a traceback (set HYDRA_FULL_ERROR=1 for one).
"""
from __future__ import annotations

import textwrap


class UserError(Exception):
    """A mistake in the user's input. `key` is the config key to change, `fix` how."""

    exit_code = 2

    def __init__(self, what: str, key: str | None = None, fix: str | None = None):
        self.what, self.key, self.fix = what.strip(), key, (fix or "").strip()
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        parts = [self.what.rstrip(".") + "."]
        if self.key:
            parts.append(f"Config key: `{self.key}`.")
        if self.fix:
            parts.append(self.fix.rstrip(".") + ".")
        return textwrap.fill(" ".join(parts), width=100, break_on_hyphens=False,
                             break_long_words=False)


def exit_with(err: UserError) -> "NoReturn":  # noqa: F821
    """Print the paragraph to stderr and exit 2 — no traceback unless HYDRA_FULL_ERROR=1."""
    import os
    import sys

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {err.paragraph()}", file=sys.stderr, flush=True)
    raise SystemExit(err.exit_code)
