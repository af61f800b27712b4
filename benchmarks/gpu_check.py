"""The GPU comparison of issue 6, as one prepared run (under 10 minutes on an H100/H200).

  python benchmarks/gpu_check.py [--out=DIR] [--steps=30] [--sizes=448x16,224x64] [--dry_run]

For each (image size, batch size): hml_jax's train step (python -m hml_jax.benchmark, float32 and
bfloat16) and PyTorch's (benchmarks/torch_reference.py: eager float32, then channels_last +
bf16 autocast, then the same under torch.compile: its best configuration is the one to beat).
Each run is a separate process, so one framework's memory pool does not slow the other. Prints
one table and writes every JSON line and the table to --out: images/s, the ratio to PyTorch's
best, and MFU = XLA's count of the step's FLOPs (the same network in both frameworks) x images/s /
the chip's dense bf16 peak (PEAK_TFLOPS). On a machine without TensorFlow the input pipeline is
not measured here (input_images_per_sec is null).

--dry_run prints the commands only. CPU runs work too (small sizes), which is how this script is
tested.
"""
import argparse
import json
import os
import subprocess
import sys
import time

# Dense bfloat16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (SXM parts, no sparsity).
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(image_size, batch_size, steps, python=sys.executable):
  """[(label, argv)] of one size: hml_jax's runs, then PyTorch's."""
  jax_run = [python, '-m', 'hml_jax.benchmark', '--config=configs/voc.py',
             f'--config.image_size={image_size}', f'--config.batch_size={batch_size}',
             f'--config.eval_batch_size={batch_size}', f'--steps={steps}', '--input_images=0']
  torch_run = [python, 'benchmarks/torch_reference.py', f'--image_size={image_size}',
               f'--batch_size={batch_size}', f'--steps={steps}']
  return [
      ('hml_jax float32', jax_run + ['--config.half_precision=False']),
      ('hml_jax bfloat16', jax_run + ['--config.half_precision=True']),
      ('torch eager float32', torch_run),
      ('torch channels_last bf16', torch_run + ['--channels_last', '--bf16']),
      ('torch compile channels_last bf16', torch_run + ['--channels_last', '--bf16', '--compile']),
  ]


def run(label, argv, log):
  """The JSON line a benchmark prints, or {'error': ...} (a failed PyTorch option must not stop
  the comparison)."""
  start = time.perf_counter()
  process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
  log.write(f'# {label}: {" ".join(argv)}\n{process.stdout}{process.stderr[-4000:]}\n')
  log.flush()
  lines = [line for line in process.stdout.splitlines() if line.startswith('{')]
  if process.returncode or not lines:
    return {'error': f'exit {process.returncode}: {process.stderr.strip()[-300:]}'}
  result = json.loads(lines[-1])
  result['wall_seconds'] = round(time.perf_counter() - start, 1)
  return result


def peak_tflops(device_name):
  for name, peak in PEAK_TFLOPS.items():
    if name in (device_name or ''):
      return peak
  return None


def table(results):
  """Rows of (size, label, images/s, ratio to PyTorch's best, MFU %)."""
  rows = []
  for size, runs in results.items():
    flops = next((r.get('train_flops_per_image') for label, r in runs
                  if label.startswith('hml_jax') and r.get('train_flops_per_image')), None)
    device = next((r.get('device') for _, r in runs if r.get('device')), '')
    torch_best = max((r.get('train_images_per_sec') or 0 for label, r in runs
                      if label.startswith('torch')), default=0)
    peak = peak_tflops(device)
    for label, result in runs:
      rate = result.get('train_images_per_sec')
      ratio = rate / torch_best if rate and torch_best else None
      mfu = 100 * flops * rate / (peak * 1e12) if rate and flops and peak else None
      rows.append((size, label, rate, ratio, mfu, result.get('error')))
  return rows


def format_table(rows):
  lines = ['| size x batch | run | images/s | vs PyTorch best | MFU (bf16 peak) |',
           '|---|---|---|---|---|']
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
  parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/hml_jax_gpu_check'))
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--sizes', default='448x16,224x64',
                      help='image_size x batch_size pairs, comma-separated')
  parser.add_argument('--dry_run', action='store_true')
  args = parser.parse_args()
  sizes = [tuple(int(n) for n in pair.split('x')) for pair in args.sizes.split(',')]
  if args.dry_run:
    for image_size, batch_size in sizes:
      for label, argv in commands(image_size, batch_size, args.steps):
        print(f'{label}: {" ".join(argv)}')
    return
  os.makedirs(args.out, exist_ok=True)
  results = {}
  with open(os.path.join(args.out, 'gpu_check.log'), 'w') as log:
    for image_size, batch_size in sizes:
      size = f'{image_size}x{image_size} x {batch_size}'
      results[size] = [(label, run(label, argv, log))
                       for label, argv in commands(image_size, batch_size, args.steps)]
      print(format_table(table({size: results[size]})), flush=True)
  with open(os.path.join(args.out, 'gpu_check.json'), 'w') as f:
    json.dump({size: dict(runs) for size, runs in results.items()}, f, indent=1)
  summary = format_table(table(results))
  with open(os.path.join(args.out, 'gpu_check.md'), 'w') as f:
    f.write(summary + '\n')
  print(summary)


if __name__ == '__main__':
  main()
