"""The dataset-distillation report's columns (no torch: the report reads finished runs)."""
from __future__ import annotations

from distill_cli import keys

REPORT_COLUMNS = {keys.BEST_TEST_ACC1: "best acc1", keys.LAST_TEST_ACC1: "last acc1",
                  keys.BEST_TEST_MODEL_STD: "eval-net std",
                  keys.TEACHER_TEST_ACC1: "teacher acc1", keys.WALL_S: "wall s"}
