#!/bin/bash
# The language-model table of benchmarks/results/lm_stdlib_tiny.md: every objective on the same
# store-trained teacher (recipe=lm_stdlib_tiny: gpt d128x4 -> gpt_tiny, stdlib bytes), 3 seeds,
# one run at a time at 1 thread (~1 min a run once the teacher is stored, ~6 min the first time),
# then the report with mean ± std over seeds and wall time:
#   [SEEDS='0 1 2'] bash benchmarks/lm_table.sh [out dir, default /tmp/lmtable3] [losses...]
set -u
OUT=${1:-/tmp/lmtable3}
shift || true
LOSSES=${*:-lm_ce fkl rkl gkd gkd_onpolicy skl srkl tvd topk lm_taid seqkd}
source "$(dirname "$0")/lib.sh"
for seed in ${SEEDS:-0 1 2}; do
  for loss in $LOSSES; do one $loss/s$seed recipe=lm_stdlib_tiny loss=$loss seed=$seed logger=none; done
done
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
