#!/bin/bash
# The step-distillation table of benchmarks/results/diffusion_digits.md: every method on the
# same stored teacher (diffusion_digits: unet_tiny, VP cosine, v, DDIM 16 steps), 3 seeds, one
# run at a time at 1 thread (about 30 min on one core once the teacher is stored for the step
# distillation methods; the distribution-matching ones, which run three networks a step, ~10 min
# a run), then the teacher's own FD at each step count and the report (FD per step count):
#   [SEEDS='0 1 2'] bash benchmarks/diffusion_digits_table.sh [out dir, default /tmp/difftable] [methods...]
set -u
OUT=${1:-/tmp/difftable}
shift || true
METHODS=${*:-progressive consistency consistency_training reflow direct dmd dmd2 sid fdistill phased_dmd}
source "$(dirname "$0")/lib.sh"
for seed in ${SEEDS:-0 1 2}; do
  for m in $METHODS; do one $m/s$seed recipe=diffusion_digits loss=$m seed=$seed logger=none; done
done
${PYTHON:-.venv/bin/python} - "$OUT" <<'PY'
import json, sys, pathlib
s = json.loads(next(pathlib.Path(sys.argv[1]).glob("progressive/s0/summary.json")).read_text())
steps = sorted({int(k.split("@")[1]) for k in s if k.startswith("teacher/test/fd@")})
print("teacher FD by steps: " + ", ".join(f"{n}: {s[f'teacher/test/fd@{n}']:.2f}" for n in steps))
print("teacher KID by steps: " + ", ".join(f"{n}: {s[f'teacher/test/kid@{n}']:.4f}" for n in steps))
print("teacher recall by steps: " + ", ".join(f"{n}: {s[f'teacher/test/recall@{n}']:.3f}" for n in steps))
PY
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
