"""Where the time of one train step goes, per XLA operation (docs/history.md).

  PYTHONPATH=. python benchmarks/profile_train_step.py --config=configs/paper.py \
      --config.image_size=224 --config.batch_size=16 [--config.convolutions=native] [--top=25] \
      [--step=eval --config.eval_batch_size=16]

Compiles the config's real train step on synthetic data (hml_jax.benchmark), records one step
with jax.profiler (a Perfetto trace, kept in --trace_dir for ui.perfetto.dev or TensorBoard), and
joins each traced operation with the optimized HLO (shape, op name), then prints: the step time,
time per kind of operation (ynn_fusion = YNNPACK's matmuls and convolutions on CPU), time by
forward/backward, and the slowest operations. The HLO text is written next to the trace.
"""
import collections
import glob
import gzip
import json
import os
import re
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

if __name__ == '__main__':
  # First thing, before JAX allocates: the malloc users get (allocator.py), so that the profile
  # is of the step they run and not of page faults.
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from ml_collections import config_flags

import numpy as np

from hml_jax.runtime import host
from hml_jax.tools import benchmark

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'A training configuration.', lock_config=True)
flags.DEFINE_string('trace_dir', '/tmp/hml_jax_profile', 'Where the trace and HLO go.')
flags.DEFINE_integer('top', 25, 'How many of the slowest operations to list.')
flags.DEFINE_integer('num_labels', 20, 'Labels of the synthetic data.')
flags.DEFINE_enum(
    'step', 'train', ['train', 'eval'], 'Which step: train, or eval (the forward '
    'pass of evaluation and prediction, with the kernels transposed beforehand).')
flags.mark_flags_as_required(['config'])

_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\(')


def instructions_of(hlo_text):
  """{instruction name: (shape, its HLO line)} of an optimized HLO module's text."""
  found = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      found[match.group(1)] = (match.group(2), line)
  return found


def traced_durations(trace_dir, names):
  """{instruction name: microseconds} summed over the complete events of the Perfetto trace."""
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'No perfetto_trace.json.gz under {trace_dir}.')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  durations = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in names:
      durations[event['name']] += event.get('dur', 0)
  return durations


def op_name(line):
  match = re.search(r'op_name="([^"]+)"', line)
  return match.group(1) if match else ''


def main(argv):
  del argv
  host.setup()
  config = FLAGS.config
  step, eval_fn, state, batch, schedule, mesh = benchmark.synthetic_train_step(
      config, FLAGS.num_labels)
  batch_size = config.batch_size
  if FLAGS.step == 'eval':
    batch_size = config.eval_batch_size
    batch = benchmark.synthetic_eval_batch(config, mesh, np.random.RandomState(1))
    # The eval step's third argument takes the role of the schedule: the transposed kernels.
    step, schedule = eval_fn.step, eval_fn.forward_matrices(state.params)
  compiled = step.lower(state, batch, schedule).compile()

  def run(state, batch, third):
    """(state, outputs) of one step: the train step returns both, the eval step scores only."""
    if FLAGS.step == 'eval':
      return state, compiled(state, batch, third)
    return compiled(state, batch, third)

  os.makedirs(FLAGS.trace_dir, exist_ok=True)
  hlo_text = compiled.as_text()
  with open(os.path.join(FLAGS.trace_dir, f'{FLAGS.step}_step.hlo.txt'), 'w') as f:
    f.write(hlo_text)
  for _ in range(2):  # warm-up
    state, metrics = run(state, batch, schedule)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(3):
    state, metrics = run(state, batch, schedule)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / 3
  jax.profiler.start_trace(FLAGS.trace_dir, create_perfetto_trace=True)
  state, metrics = run(state, batch, schedule)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()

  instructions = instructions_of(hlo_text)
  durations = traced_durations(FLAGS.trace_dir, instructions)
  total = sum(durations.values())
  print(f'step {step_seconds * 1e3:.0f} ms ({batch_size / step_seconds:.2f} img/s); '
        f'traced operations {total / 1e3:.0f} ms (operations may overlap on several threads)')
  by_kind, by_direction = collections.Counter(), collections.Counter()
  for name, micros in durations.items():
    by_kind[re.sub(r'[.\d]+$', '', name)] += micros
    name_of_op = op_name(instructions[name][1])
    # CPU: YNNPACK/XNNPACK/oneDNN fusions and plain dots; GPU: cuDNN convolutions, cuBLAS and
    # Triton GEMMs (custom calls that XLA names after their target).
    library = 'matmul/conv' if name.startswith(
        ('ynn', 'xnn', 'onednn', 'conv', 'dot', 'cudnn', 'cublas', 'gemm', 'triton')) else 'other'
    direction = ('backward' if 'transpose(' in name_of_op else
                 'forward' if name_of_op else 'unnamed (mostly kernel gradients)')
    by_direction[(library, direction)] += micros
  print('\nby kind of operation:')
  for kind, micros in by_kind.most_common(15):
    print(f'  {micros / 1e3:8.1f} ms  {kind}')
  print('\nby forward/backward:')
  for (library, direction), micros in by_direction.most_common():
    print(f'  {micros / 1e3:8.1f} ms  {library:12s} {direction}')
  print(f'\nslowest {FLAGS.top} operations:')
  for name, micros in durations.most_common(FLAGS.top):
    shape, line = instructions[name]
    print(f'  {micros / 1e3:8.1f} ms  {name[:30]:30s} {shape[:32]:32s} {op_name(line)[-60:]}')


if __name__ == '__main__':
  app.run(main)
