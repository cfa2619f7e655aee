"""The classification report's columns: summary key -> short header (one home; read by
`ClassificationTask.report_columns` and `distill-report`). No torch here: the report command
reads finished runs and starts without it."""
from __future__ import annotations

from distill_cli import keys

REPORT_COLUMNS = {keys.BEST_TEST_ACC1: "best acc1", keys.LAST_TEST_ACC1: "last acc1",
                  keys.BEST_TEST_ECE: "ece", keys.TEACHER_TEST_ACC1: "teacher acc1",
                  keys.GAIN: "gain vs CE", keys.WALL_S: "wall s",
                  keys.BEST_TEST_PGD_ACC1: "pgd acc1"}
