#!/bin/bash
# The dataset-distillation table of benchmarks/results/dd_digits.md: method x IPC on digits,
# 3 seeds, one run at a time at 1 thread (about 40 min on 2 cores), then the report:
#   bash benchmarks/dd_digits_table.sh [out dir, default /tmp/ddtable]
set -u
OUT=${1:-/tmp/ddtable}
source "$(dirname "$0")/lib.sh"
set_run() { # name ipc seed overrides...
  local name=$1 ipc=$2 seed=$3; shift 3
  one $name/ipc$ipc/s$seed logger=none trainer.epochs=2 task.iterations=100 student.ipc=$ipc \
    seed=$seed "$@"
}
for ipc in 1 10; do for seed in 0 1 2; do
  set_run real $ipc $seed recipe=dd_digits loss=dm optimizer.lr=1e-9   # the start, never moved
  for m in dm datadam dc dsa mtt; do set_run $m $ipc $seed recipe=dd_digits loss=$m; done
  for m in sre2l cda; do set_run $m $ipc $seed recipe=dd_digits_sre2l loss=$m; done
done; done
set_run full 120 0 recipe=dd_digits loss=dm optimizer.lr=1e-9          # ~all of train, same protocol
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
