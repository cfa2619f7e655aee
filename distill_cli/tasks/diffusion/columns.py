"""The diffusion report's columns (no torch: the report reads finished runs). FD/KID are in the
feature space of the stored classifier `task.feature_net` (never "FID"), at the model's own step
count; `distill-report` also shows FD per step count (`best/test/fd_<arch>@<steps>`)."""
from __future__ import annotations

import re

from distill_cli import keys

MAIN_METRIC = "best/test/fd"                    # what a report of generators ranks by
STEP_KEY = re.compile(r"^best/test/fd@(\d+)$")   # FD at each evaluated step count

REPORT_COLUMNS = {MAIN_METRIC: "best FD", "best/test/kid": "KID",
                  "best/test/recall": "recall", "best/test/class_entropy": "class cov.",
                  "best/test/class_acc": "class acc", "best/test/class_fd": "class FD",
                  "best/test/steps": "steps",
                  "teacher/test/fd": "teacher FD", keys.WALL_S: "wall s"}
