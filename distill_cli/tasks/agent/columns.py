"""The agent task's report columns (no torch: the report reads finished runs)."""
from __future__ import annotations

SUCCESS = "best/test/success"   # what ranks agent runs (distill-report)
REPORT_COLUMNS = {SUCCESS: "success", "best/test/tool_use": "tool use",
                  "best/test/call_acc": "call acc", "best/test/ppl": "best ppl",
                  "best/test/agreement": "agreement", "teacher/test/success": "teacher success",
                  "wall_s": "wall s"}
