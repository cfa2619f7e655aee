"""Seeds derived from names and numbers: the same everywhere, for every process."""
from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a stable (cross-process, cross-platform) function of `parts`."""
    text = "\x1f".join(p if isinstance(p, str) else repr(int(p)) for p in parts)
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
