#!/usr/bin/env bash
# Trains every (loss, label scenario, seed) of the README's results table on the embedded default
# dataset, one workdir each under OUT_DIR. Finished runs are skipped (their results.json exists);
# interrupted ones resume. Then prints the table (scripts/summarize_runs.py).
#   bash scripts/run_seeds.sh [OUT_DIR] [SEEDS] [LOSSES] [SCENARIOS] [-- EXTRA FLAGS...]
# e.g. the learning-rate sweep of the README:
#   bash scripts/run_seeds.sh runs/lr1e-2 0 "hml an" single_positive -- --config.learning_rate=1e-2
set -euo pipefail
out=${1:-runs/table}
seeds=${2:-"0 1 2"}
losses=${3:-"hml an"}
scenarios=${4:-"single_positive full"}
shift $(( $# < 4 ? $# : 4 ))
if [ "${1:-}" = "--" ]; then shift; fi
mkdir -p "$out"
for scenario in $scenarios; do
  for loss in $losses; do
    for seed in $seeds; do
      workdir="$out/${loss}_${scenario}_seed${seed}"
      if [ -f "$workdir/results.json" ]; then continue; fi
      echo "== $workdir $*"
      /usr/bin/time -f "%e s wall" python -m hml_jax.main --config=configs/default.py \
        --workdir="$workdir" --config.loss="$loss" --config.label_scenario="$scenario" \
        --config.seed="$seed" "$@" 2>&1 | grep -E "Epoch [0-9]+:|Best epoch|s wall|Error|error" || true
    done
  done
done
PYTHONPATH=. python scripts/summarize_runs.py "$out"
