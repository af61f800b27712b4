#!/usr/bin/env bash
# The README's whole GPU check in one command, for a lent GPU whose time is short:
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [all|input|profile]
#
# 'input' runs steps 1 and 3 only (about 2-5 minutes): the train step and PyTorch were measured
# on an H200 already (benchmarks/results/2026-11-28-h200/), the input pipeline not yet.
# 'profile' runs steps 1, 2 and 5 only (about 3 minutes): where the bf16 step's time goes, the
# first thing to know before raising its model FLOP utilisation (docs/performance.md, "Towards
# 25% MFU").
# 1. The card, the CPU count and the versions, to OUT_DIR/machine.txt.
# 2. A smoke run of hml_jax's train step at 64x64: if the environment is broken (a missing package,
#    an API that changed), this stops here within a minute instead of spending the lease.
# 3. The input pipeline on all the host's cores (224x224 batch 64 and 448x448 batch 16; it was
#    never measured on a GPU host, so it goes first): the 'pil' decoder's stage on 1..all threads
#    (benchmarks/benchmark_decode.py, PIL and NumPy only, at most 120 s) to OUT_DIR/decode.md, and
#    where TensorFlow can be imported the whole tf.data pipeline with both decoders (at most
#    200 s) to OUT_DIR/input_pipeline.md.
# 4. benchmarks/side_by_side.py --device=gpu, every run stopped at SECONDS (default 540) from the
#    start; the results so far are written after every run.
# 5. ('profile' only) benchmarks/profile_train_step.py on the bf16 ResNet-50 step at 448x448 batch
#    16 (at most 240 s): a jax.profiler trace to OUT_DIR/profile/ (open it in ui.perfetto.dev)
#    and the time per operation joined with the optimized HLO to OUT_DIR/profile.txt. The join
#    was written on CPU traces; on a GPU it may find fewer names, and the trace is kept anyway.
# Needs python3 with jax (CUDA), flax, optax, orbax, ml_collections, torch, torchvision and
# pillow; TensorFlow only for the second half of step 3. Errors of steps 2 and 3 go to
# OUT_DIR/session.log.
set -u
usage='usage: bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [all|input|profile]'
out=${1:?$usage}
budget=${2:-540}
parts=${3:-all}
[[ $parts == all || $parts == input || $parts == profile ]] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd) || exit  # absolute, before moving to the repository root
cd "$(dirname "$0")/.." || exit
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts/ import hml_jax
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version \
    --format=csv
  echo "cpus: $(nproc)"
  python3 -c 'import jax, flax, optax, orbax.checkpoint, ml_collections, torch, torchvision
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", orbax.checkpoint.__version__, "torch", torch.__version__, jax.devices())'
} 2>&1 | tee "$out/machine.txt"
if [[ $parts != input ]] && ! python3 -m hml_jax.benchmark --config=configs/voc.py \
    --config.image_size=64 --config.batch_size=8 --config.eval_batch_size=8 \
    --config.half_precision=True --steps=3 --input_images=0 \
    >"$out/smoke.json" 2>"$out/session.log"; then
  tail -n 60 "$out/session.log"
  echo "gpu_session: the smoke run failed; nothing else was run" >&2
  exit 3
fi
[[ $parts != input ]] && cat "$out/smoke.json"
if [[ $parts == profile ]]; then
  timeout 240 python3 benchmarks/profile_train_step.py --config=configs/voc.py \
    --config.image_size=448 --config.batch_size=16 --config.half_precision=True --top=40 \
    --trace_dir="$out/profile" 2>>"$out/session.log" | tee "$out/profile.txt"
  exit 0
fi
timeout 120 python3 benchmarks/benchmark_decode.py --image_size=224,448 --batch_size=64,16 \
  --num_images=1024 2>>"$out/session.log" | tee "$out/decode.md"
if python3 -c 'import tensorflow' 2>/dev/null; then
  timeout 200 python3 benchmarks/benchmark_input_pipeline.py --image_size=224,448 \
    --batch_size=64,16 --num_images=1024 --epochs=4 --parallel_calls=-1 \
    --decoder=pil,tensorflow \
    2>>"$out/session.log" | tee "$out/input_pipeline.md"
else
  echo 'No TensorFlow on this machine: the input pipeline was not measured.' \
    | tee "$out/input_pipeline.md"
fi
[[ $parts == input ]] && exit 0
left=$((budget - SECONDS))
((left > 0)) || left=1  # 0 would mean no deadline: side_by_side then starts nothing
python3 benchmarks/side_by_side.py --device=gpu --out="$out" --deadline_seconds="$left"
