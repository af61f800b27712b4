"""hml_jax against PyTorch on one machine, side by side in one run: the numbers of the README.

  python benchmarks/side_by_side.py --device=cpu   # 64x64 batch 32 and 224x224 batch 16
  python benchmarks/side_by_side.py --device=gpu   # 448x448 batch 16 and 224x224 batch 64
      [--out=DIR] [--steps=N] [--sizes=448x16,...] [--deadline_seconds=S] [--dry_run]

For each (image size, batch size): hml_jax's train step (python -m hml_jax.benchmark) and
PyTorch's (benchmarks/torch_reference.py, the same ResNet-50 + cosine head + adaptive loss +
Adam), each run in its own process, so one framework's memory does not slow the other.
- gpu: hml_jax in float32 and bfloat16; PyTorch eager float32, channels_last + bf16 autocast, and
  the same under torch.compile (its best configuration is the one to beat). 9 minutes on an
  H200; benchmarks/gpu_session.sh runs it with a smoke run first and a deadline.
- cpu: hml_jax as installed (its command restarts itself with TBB's malloc from the `tbb` wheel,
  hml_jax/runtime/allocator.py), both frameworks with the system malloc, and both with tcmalloc preloaded
  (when installed): the allocator matters on CPU (docs/performance.md "Speed on CPU").
Each command runs --repeats times, interleaved, and its fastest run counts (all are kept).
Prints a table and writes every JSON line, a log and the table to --out: images/s, the ratio to
PyTorch's best run of that size, and on GPUs MFU = XLA's count of the lowered step's FLOPs (the
same network in both frameworks) x images/s / the chip's dense bf16 peak (PEAK_TFLOPS). Where
TensorFlow is missing (the GPU machine) the input pipeline is not measured (null).

--dry_run prints the commands only.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

# Dense bfloat16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (SXM parts, no sparsity).
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# repeats: every command runs that many times, interleaved, and the fastest run counts (on a
# shared or throttling CPU a neighbour's burst only slows a run down).
PRESETS = {
    'gpu': {
        'sizes': '448x16,224x64',
        'steps': 50,
        'repeats': 1
    },
    'cpu': {
        'sizes': '64x32,224x16',
        'steps': 12,
        'repeats': 3
    }
}


def commands(device,
             image_size,
             batch_size,
             steps,
             python=sys.executable,
             torch_python=None,
             tcmalloc=''):
  """[(label, argv)] of one size, most telling first on GPUs. argv may start with
  `env LD_PRELOAD=...`."""
  torch_python = torch_python or python
  jax_run = [
      python, '-m', 'hml_jax.benchmark', '--config=configs/voc.py',
      f'--config.image_size={image_size}', f'--config.batch_size={batch_size}',
      f'--config.eval_batch_size={batch_size}', f'--steps={steps}', '--input_images=0'
  ]
  torch_run = [
      torch_python, 'benchmarks/torch_reference.py', f'--image_size={image_size}',
      f'--batch_size={batch_size}', f'--steps={steps}'
  ]
  if device == 'gpu':
    # Most telling first, so that a run cut short by its deadline still has the comparison:
    # each framework's best configuration, then PyTorch's eager ones, then float32 hml_jax.
    return [
        ('hml_jax bfloat16', jax_run + ['--config.half_precision=True']),
        ('torch compile channels_last bf16',
         torch_run + ['--channels_last', '--bf16', '--compile']),
        ('torch channels_last bf16', torch_run + ['--channels_last', '--bf16']),
        ('torch eager float32', torch_run),
        ('hml_jax float32', jax_run + ['--config.half_precision=False']),
    ]
  runs = [('hml_jax float32, as installed (tbbmalloc)', jax_run),
          ('hml_jax float32, system malloc', ['env', 'HML_JAX_MALLOC=system'] + jax_run),
          ('torch eager float32, system malloc', torch_run)]
  if tcmalloc:
    preload = ['env', f'LD_PRELOAD={tcmalloc}']
    runs += [('hml_jax float32, tcmalloc', preload + jax_run),
             ('torch eager float32, tcmalloc', preload + torch_run)]
  return runs


def run(label, argv, log, timeout=None):
  """The JSON line a benchmark prints, or {'error': ...} (a failed PyTorch option must not stop
  the comparison; nor may one that outlasts timeout seconds)."""
  start = time.perf_counter()
  # A session of its own, so that a timeout stops its helpers too (torch.compile's workers).
  process = subprocess.Popen(argv,
                             cwd=ROOT,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             text=True,
                             start_new_session=True)
  log.write(f'# {label}: {" ".join(argv)}\n')
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    log.write(f'stopped after {timeout:.0f} s (the deadline)\n')
    log.flush()
    return {'error': f'stopped after {timeout:.0f} s by --deadline_seconds'}
  log.write(f'{stdout}{stderr[-4000:]}\n')
  log.flush()
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  if process.returncode or not lines:
    return {'error': f'exit {process.returncode}: {stderr.strip()[-300:]}'}
  result = json.loads(lines[-1])
  result['wall_seconds'] = round(time.perf_counter() - start, 1)
  return result


def fastest(runs):
  """The run with the highest train rate, with every run's rate under 'train_images_per_sec_runs'
  (or the last error when none succeeded)."""
  succeeded = [r for r in runs if r.get('train_images_per_sec')]
  if not succeeded:
    return runs[-1]
  best = dict(max(succeeded, key=lambda r: r['train_images_per_sec']))
  best['train_images_per_sec_runs'] = [r.get('train_images_per_sec') for r in runs]
  return best


def peak_tflops(device_name):
  for name, peak in PEAK_TFLOPS.items():
    if name in (device_name or ''):
      return peak
  return None


def device_count(device):
  """How many chips a run's 'device' names: hml_jax writes '8 x NVIDIA H200', PyTorch one name."""
  match = re.match(r'(\d+) x ', device or '')
  return int(match.group(1)) if match else 1


def table(results):
  """Rows of (size, label, images/s, ratio to PyTorch's best, MFU %). MFU counts each run's own
  FLOPs (those of hml_jax's first run for PyTorch's: the same network) over the peak of every
  chip the run used."""
  rows = []
  for size, runs in results.items():
    network_flops = next((r.get('train_flops_per_image')
                          for label, r in runs
                          if label.startswith('hml_jax') and r.get('train_flops_per_image')), None)
    device = next((r.get('device') for _, r in runs if r.get('device')), '')
    torch_best = max(
        (r.get('train_images_per_sec') or 0 for label, r in runs if label.startswith('torch')),
        default=0)
    peak = peak_tflops(device)
    for label, result in runs:
      rate = result.get('train_images_per_sec')
      flops = result.get('train_flops_per_image') or network_flops
      ratio = rate / torch_best if rate and torch_best else None
      mfu = (100 * flops * rate / (peak * 1e12 * device_count(result.get('device') or device))
             if rate and flops and peak else None)
      rows.append((size, label, rate, ratio, mfu, result.get('error')))
  return rows


def format_table(rows):
  lines = [
      '| size x batch | run | train images/s | vs PyTorch best | MFU (bf16 peak) |',
      '|---|---|---|---|---|'
  ]
  for size, label, rate, ratio, mfu, error in rows:
    if error:
      lines.append(f'| {size} | {label} | failed: {error[:80]} | | |')
      continue
    lines.append(f'| {size} | {label} | {rate:.1f} | '
                 f'{"" if ratio is None else f"{ratio:.2f}x"} | '
                 f'{"" if mfu is None else f"{mfu:.1f}%"} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--device', choices=sorted(PRESETS), required=True)
  parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/hml_jax_side_by_side'))
  parser.add_argument('--steps', type=int, default=0, help='0: the preset\'s')
  parser.add_argument('--sizes',
                      default='',
                      help="image_size x batch_size pairs, comma-separated ('': the preset's)")
  parser.add_argument('--repeats', type=int, default=0, help="0: the preset's")
  parser.add_argument('--torch_python',
                      default='',
                      help='the Python that has torch and torchvision (default: this one)')
  parser.add_argument('--deadline_seconds',
                      type=float,
                      default=0,
                      help='stop every run at this many seconds from the start and start none '
                      'after it, keeping the results so far (a lent GPU\'s time is short); 0: none')
  parser.add_argument('--dry_run', action='store_true')
  args = parser.parse_args()
  preset = PRESETS[args.device]
  steps = args.steps or preset['steps']
  repeats = args.repeats or preset['repeats']
  sizes = [
      tuple(int(n) for n in pair.split('x')) for pair in (args.sizes or preset['sizes']).split(',')
  ]
  sys.path.insert(0, ROOT)
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  tcmalloc = allocator.installed_tcmalloc() if args.device == 'cpu' else ''

  def size_commands(image_size, batch_size):
    return commands(args.device,
                    image_size,
                    batch_size,
                    steps,
                    torch_python=args.torch_python or None,
                    tcmalloc=tcmalloc)

  if args.dry_run:
    for image_size, batch_size in sizes:
      for label, argv in size_commands(image_size, batch_size):
        print(f'{label}: {" ".join(argv)}')
    return
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()

  def seconds_left():
    return args.deadline_seconds - (time.perf_counter() - start) if args.deadline_seconds else None

  # Configuration-major: every size's first configuration, then every size's second..., so that
  # a deadline cuts the least telling runs of all sizes, not every run of the last size.
  plan = [(f'{image_size}x{image_size} x {batch_size}', size_commands(image_size, batch_size))
          for image_size, batch_size in sizes]
  runs = {size: {} for size, _ in plan}
  results = {}
  with open(os.path.join(args.out, 'side_by_side.log'), 'w') as log:
    for _ in range(repeats):
      for position in range(max(len(size_runs) for _, size_runs in plan)):
        for size, size_runs in plan:
          if position >= len(size_runs):
            continue
          label, argv = size_runs[position]
          left = seconds_left()
          # No run compiles and measures in under 30 s: one started later would only be killed.
          if left is not None and left < 30:
            result = {'error': 'not run: past --deadline_seconds'}
          else:
            result = run(label, argv, log, timeout=left)
          runs[size].setdefault(label, []).append(result)
          print(f'{size} {label}: {result.get("train_images_per_sec") or result.get("error")}',
                flush=True)
          # Written after every run, so that a session cut short keeps what was measured.
          results = {
              each: [(name, fastest(name_runs)) for name, name_runs in each_runs.items()]
              for each, each_runs in runs.items()
          }
          write_results(args.out, results)
  print(write_results(args.out, results))


def write_results(out, results):
  """side_by_side.json (every run) and side_by_side.md (the table); returns the table."""
  with open(os.path.join(out, 'side_by_side.json'), 'w') as f:
    json.dump({size: dict(runs) for size, runs in results.items()}, f, indent=1)
  summary = format_table(table(results))
  with open(os.path.join(out, 'side_by_side.md'), 'w') as f:
    f.write(summary + '\n')
  return summary


if __name__ == '__main__':
  main()
