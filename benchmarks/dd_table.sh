#!/bin/bash
# A dataset-distillation table: method x IPC x seed on one recipe (default dd_fmnist_cpu), 1 thread
# a run, then the report. Several copies may run at once on one OUT (e.g. one per core): each
# claims a run before starting it (mkdir is atomic), so none runs twice; rerunning skips finished
# runs — delete $OUT/.claims to retry unfinished ones after an interruption.
#   RECIPE=dd_fmnist_cpu bash benchmarks/dd_table.sh [out dir] & bash benchmarks/dd_table.sh [same]
# The order puts whole seeds first (seed 0's every cell, then seed 1's, ...), IPC 50 last: a run
# cut short still leaves full rows. MTT's first run trains the experts into the store once.
set -u
OUT=${1:-/tmp/ddtable_${RECIPE:-dd_fmnist_cpu}}
RECIPE=${RECIPE:-dd_fmnist_cpu}
METHODS=${METHODS:-"real dm datadam dc dsa mtt sre2l cda"}
IPCS=${IPCS:-"1 10"}
IPCS_LATE=${IPCS_LATE:-"50"}                 # after every seed of IPCS
METHODS_LATE=${METHODS_LATE:-"real dm datadam"}
SEEDS=${SEEDS:-"0 1 2"}
source "$(dirname "$0")/lib.sh"
mkdir -p "$OUT/.claims"
set_run() { # method ipc seed
  local m=$1 ipc=$2 seed=$3 loss=$1 recipe=$RECIPE extra=()
  # the seeded real start, never moved: one DM update at lr 1e-9 (the IPC 1 / 10 rows of
  # results/dd_fmnist.md ran 100; the sets differ by at most 1.4e-7, measured at IPC 1 seed 0)
  [ "$m" = real ] && loss=dm extra=(optimizer.lr=1e-9 task.iterations=1)
  # SRe2L / CDA recover from a store teacher: the recipe's <recipe>_sre2l sibling (teacher, Adam)
  case $m in sre2l|cda) recipe=${RECIPE}_sre2l ;; esac
  mkdir "$OUT/.claims/$m-ipc$ipc-s$seed" 2>/dev/null || return 0
  one $m/ipc$ipc/s$seed recipe=$recipe loss=$loss student.ipc=$ipc seed=$seed logger=none \
    "${extra[@]}"
}
for m in $METHODS; do [ "$m" = mtt ] && set_run mtt ${IPCS%% *} ${SEEDS%% *}; done
for seed in $SEEDS; do for ipc in $IPCS; do for m in $METHODS; do set_run $m $ipc $seed; done; done; done
for seed in $SEEDS; do for ipc in $IPCS_LATE; do for m in $METHODS_LATE; do set_run $m $ipc $seed; done; done; done
# The training pool through the same evaluation, shortened: FULL_IPC a class (5,368: the smallest
# class of dd_fmnist_cpu's 54,000 training images, so 99.4% of them), FULL_EPOCHS epochs, one test
# network (300 epochs x 6 networks over 54,000 images would take hours on a CPU); FULL_IPC= skips it.
if [ -n "${FULL_IPC-5368}" ] && mkdir "$OUT/.claims/full" 2>/dev/null; then
  one full/s0 recipe=$RECIPE loss=dm optimizer.lr=1e-9 student.ipc=${FULL_IPC:-5368} seed=0 \
    task.iterations=1 task.eval.epochs=${FULL_EPOCHS:-5} task.eval.models=1 logger=none
fi
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
