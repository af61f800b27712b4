#!/usr/bin/env bash
# Trains every (loss, label scenario, seed) of the README's results table on the embedded default
# dataset, one workdir each under $1 (default runs/table). Finished runs are skipped (their
# results.json exists); interrupted ones resume. Then prints the table.
#   bash scripts/run_seeds.sh [OUT_DIR] [SEEDS] [LOSSES] [SCENARIOS]
set -euo pipefail
out=${1:-runs/table}
seeds=${2:-"0 1 2"}
losses=${3:-"hml an"}
scenarios=${4:-"single_positive full"}
mkdir -p "$out"
for scenario in $scenarios; do
  for loss in $losses; do
    for seed in $seeds; do
      workdir="$out/${loss}_${scenario}_seed${seed}"
      if [ -f "$workdir/results.json" ]; then continue; fi
      echo "== $workdir"
      /usr/bin/time -f "%e s wall" python -m hml_jax.main --config=configs/default.py \
        --workdir="$workdir" --config.loss="$loss" --config.label_scenario="$scenario" \
        --config.seed="$seed" 2>&1 | grep -E "Epoch [0-9]+:|Best epoch|s wall|Error|error" || true
    done
  done
done
python scripts/summarize_runs.py "$out"
