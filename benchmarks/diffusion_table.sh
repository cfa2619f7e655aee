#!/bin/bash
# The step-distillation tables: every method on one recipe's stored teacher, 3 seeds, one run
# at a time at 1 thread, then the teacher's own FD at each step count and the report (FD per
# step count). RECIPE=diffusion_digits (default; benchmarks/results/diffusion_digits.md: unet_tiny,
# VP cosine, v, DDIM 16 steps; ~30 min on one core for the step-distillation methods once the
# teacher is stored, ~10 min a run for the distribution-matching ones, which run three networks a
# step) or RECIPE=diffusion_fmnist_cpu (benchmarks/results/diffusion_fmnist.md). Two copies with
# disjoint method lists use both cores (each run is rerunnable: finished runs are kept):
#   [RECIPE=...] [SEEDS='0 1 2'] bash benchmarks/diffusion_table.sh [out dir, default /tmp/difftable] [methods...]
set -u
OUT=${1:-/tmp/difftable}
shift || true
METHODS=${*:-progressive consistency consistency_training reflow direct dmd dmd2 sid fdistill phased_dmd}
source "$(dirname "$0")/lib.sh"
for seed in ${SEEDS:-0 1 2}; do
  for m in $METHODS; do one $m/s$seed recipe=${RECIPE:-diffusion_digits} loss=$m seed=$seed logger=none; done
done
${PYTHON:-.venv/bin/python} - "$OUT" <<'PY'
import json, sys, pathlib
# the teacher's own numbers, from the first seed-0 run that has a teacher
s = next(s for p in sorted(pathlib.Path(sys.argv[1]).glob("*/s0/summary.json"))
         if "teacher/test/fd" in (s := json.loads(p.read_text())))
steps = sorted({int(k.split("@")[1]) for k in s if k.startswith("teacher/test/fd@")})
print("teacher FD by steps: " + ", ".join(f"{n}: {s[f'teacher/test/fd@{n}']:.2f}" for n in steps))
print("teacher KID by steps: " + ", ".join(f"{n}: {s[f'teacher/test/kid@{n}']:.4f}" for n in steps))
print("teacher recall by steps: " + ", ".join(f"{n}: {s[f'teacher/test/recall@{n}']:.3f}" for n in steps))
PY
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
