"""The benchmark command prints one JSON line with every key (numbers are for the README, not
asserted here: timed tests flake)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {'framework', 'train_images_per_sec', 'compile_seconds', 'eval_images_per_sec',
        'input_images_per_sec', 'step_memory_mb', 'peak_host_memory_mb', 'device', 'jax',
        'config'}


def test_benchmark_prints_one_json_line():
  completed = subprocess.run(
      [sys.executable, '-m', 'hml_jax.benchmark', '--config=configs/tiny.py', '--steps=2',
       '--input_images=8', '--config.eval_batch_size=16'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, check=True)
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(result) == KEYS
  assert result['train_images_per_sec'] > 0 and result['input_images_per_sec'] > 0
  assert result['config']['image_size'] == 32 and result['step_memory_mb'] > 0
