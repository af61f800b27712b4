#!/usr/bin/env bash
# The README's whole GPU check in one command, for a lent GPU whose time is short:
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]
#
# 1. The card, the CPU count and the versions, to OUT_DIR/machine.txt.
# 2. A smoke run of hml_jax's train step at 64x64: if the environment is broken (a missing package,
#    an API that changed), this stops here within a minute instead of spending the lease.
# 3. benchmarks/side_by_side.py --device=gpu, every run stopped at SECONDS (default 540) from the
#    start; the results so far are written after every run.
# Needs python3 with jax (CUDA), flax, optax, orbax, ml_collections, torch and torchvision; no
# TensorFlow (the input pipeline is not measured there).
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
out=$(cd "$out" && pwd) || exit  # absolute, before moving to the repository root
cd "$(dirname "$0")/.." || exit
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version \
    --format=csv
  echo "cpus: $(nproc)"
  python3 -c 'import jax, flax, optax, orbax.checkpoint, ml_collections, torch, torchvision
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", orbax.checkpoint.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$out/machine.txt"
if ! python3 -m hml_jax.benchmark --config=configs/voc.py --config.image_size=64 \
    --config.batch_size=8 --config.eval_batch_size=8 --config.half_precision=True --steps=3 \
    --input_images=0 >"$out/smoke.json" 2>"$out/smoke.log"; then
  tail -n 60 "$out/smoke.log"
  echo "gpu_session: the smoke run failed; nothing else was run" >&2
  exit 3
fi
cat "$out/smoke.json"
python3 benchmarks/side_by_side.py --device=gpu --out="$out" \
  --deadline_seconds=$((budget - SECONDS))
