#!/bin/bash
# The agent table of benchmarks/results/agent_toolcalc.md: on one store-trained tool-using
# teacher (recipe=agent_toolcalc), a gpt_tiny student distilled (a) from the teacher's stored
# trajectories, tool calls and the calculator's real results included (seqkd), (b) from final
# answers only (lm_ce on dataset.rendering=answer: it never calls the tool), and the reference
# of CE on the scripted trajectories; success = greedy episodes with the real calculator on the
# 500 test questions. 3 seeds, one run at a time at 1 thread; then the report (ranked by success):
#   [SEEDS='0 1 2'] bash benchmarks/agent_table.sh [out dir, default /tmp/agenttable] [rows...]
set -u
OUT=${1:-/tmp/agenttable}
shift || true
ROWS=${*:-seqkd answers scripts}
source "$(dirname "$0")/lib.sh"
declare -A ARGS=([seqkd]="loss=seqkd" [answers]="loss=lm_ce dataset.rendering=answer"
                 [scripts]="loss=lm_ce")
for seed in ${SEEDS:-0 1 2}; do
  for row in $ROWS; do one $row/s$seed recipe=agent_toolcalc ${ARGS[$row]} seed=$seed logger=none; done
done
${DISTILL_REPORT:-.venv/bin/distill-report} $OUT --format md
