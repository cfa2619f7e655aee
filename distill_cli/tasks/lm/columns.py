"""The language-model report's columns (no torch: the report reads finished runs)."""
from __future__ import annotations

REPORT_COLUMNS = {"best/test/ppl": "best ppl", "last/test/ppl": "last ppl",
                  "best/test/acc1": "token acc1", "best/test/agreement": "agreement",
                  "best/test/token_kl": "token KL", "teacher/test/ppl": "teacher ppl",
                  "wall_s": "wall s"}
