# What the table scripts share (source it after setting OUT): one run at 1 thread, W&B off.
#   one <run dir under $OUT> <distill overrides...>
# runs `distill <overrides> hydra.run.dir=$OUT/<dir>` unless that run already finished
# (rerunnable: done runs stay), its output in $OUT/logs/<dir with / as ->.log.
set -u
D=${DISTILL:-.venv/bin/distill}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
mkdir -p "$OUT/logs"
one() {
  local dir=$OUT/$1 log=$OUT/logs/${1//\//-}.log
  shift
  grep -qs '"status": "finished"' "$dir/summary.json" && return
  $D "$@" hydra.run.dir="$dir" > "$log" 2>&1
}
