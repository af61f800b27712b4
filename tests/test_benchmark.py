"""The benchmark command prints one JSON line with every key (numbers are for the README, not
asserted here: timed tests flake)."""
import io
import json
import os
import subprocess
import sys
import time

import pytest

# Subprocesses, fault injection, several processes or notebooks: the fast tier skips them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    'framework', 'train_images_per_sec', 'compile_seconds', 'eval_images_per_sec',
    'input_images_per_sec', 'train_flops_per_image', 'train_tflops_per_sec', 'step_memory_mb',
    'peak_host_memory_mb', 'device', 'memory_allocator', 'jax', 'config'
}


def test_benchmark_prints_one_json_line():
  completed = subprocess.run([
      sys.executable, '-m', 'hml_jax.benchmark', '--config=configs/tiny.py', '--steps=2',
      '--input_images=8', '--config.eval_batch_size=16'
  ],
                             cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
                             capture_output=True,
                             text=True,
                             check=True)
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(result) == KEYS
  assert result['train_images_per_sec'] > 0 and result['input_images_per_sec'] > 0
  assert result['config']['image_size'] == 32 and result['step_memory_mb'] > 0


def test_benchmark_counts_the_flops_of_the_step():
  """XLA's count for a known function: a (4, 8) @ (8, 16) matmul is 2 * 4 * 8 * 16 FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hml_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 16))).compile()
  assert benchmark.xla_flops(compiled) == 2 * 4 * 8 * 16
  # A convolution is counted on the lowered program (the GPU backend's compiled count misses the
  # cuDNN calls): 2 x output pixels x kernel taps x input x output channels.
  convolution = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  lowered = convolution.lower(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)))
  assert benchmark.network_flops(lowered, lowered.compile(), 1) == 2 * (2 * 6 * 6) * 9 * 3 * 4

  class Counted:  # a backend whose lowered program has no count: the compiled one, per device

    def __init__(self, flops):
      self.flops = flops

    def cost_analysis(self):
      return {'flops': self.flops} if self.flops else {}

  assert benchmark.network_flops(Counted(0), Counted(10.0), num_devices=4) == 40.0
  assert benchmark.network_flops(Counted(30.0), Counted(10.0), num_devices=4) == 30.0


def test_side_by_side_table_ratios_and_mfu():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import side_by_side as gpu_check  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  runs = [('hml_jax float32', {
      'train_images_per_sec': 300.0,
      'train_flops_per_image': 1e11,
      'device': '1 x NVIDIA H200'
  }), ('torch eager float32', {
      'train_images_per_sec': 200.0
  }), ('torch compile channels_last bf16', {
      'train_images_per_sec': 250.0
  }), ('torch channels_last bf16', {
      'error': 'exit 1: out of memory'
  })]
  rows = gpu_check.table({'448x448 x 16': runs})
  jax_row = rows[0]
  assert jax_row[2] == 300.0 and abs(jax_row[3] - 300.0 / 250.0) < 1e-9  # vs PyTorch's best
  assert abs(jax_row[4] - 100 * 1e11 * 300.0 / 989e12) < 1e-9  # MFU, percent
  assert rows[3][5].startswith('exit 1')
  # Eight chips: the peak is eight times one chip's.
  eight = gpu_check.table({
      '224x224 x 64': [('hml_jax bfloat16', {
          'train_images_per_sec': 800.0,
          'train_flops_per_image': 1e11,
          'device': '8 x NVIDIA H200'
      })]
  })
  assert abs(eight[0][4] - 100 * 1e11 * 800.0 / (8 * 989e12)) < 1e-9
  text = gpu_check.format_table(rows)
  assert '1.20x' in text and 'failed' in text
  completed = subprocess.run(
      [sys.executable, 'benchmarks/side_by_side.py', '--device=gpu', '--dry_run'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True)
  assert completed.stdout.count('hml_jax.benchmark') == 4
  assert '--compile' in completed.stdout and '--config.image_size=224' in completed.stdout
  assert '--config.image_size=448 --config.batch_size=16' in completed.stdout
  cpu = gpu_check.commands('cpu', 64, 32, 6, python='python', tcmalloc='/lib/libtcmalloc.so.4')
  assert [label for label, _ in cpu] == [
      'hml_jax float32, as installed (tbbmalloc)', 'hml_jax float32, system malloc',
      'torch eager float32, system malloc', 'hml_jax float32, tcmalloc',
      'torch eager float32, tcmalloc'
  ]
  assert cpu[0][1][:3] == ['python', '-m', 'hml_jax.benchmark']
  assert cpu[1][1][:2] == ['env', 'HML_JAX_MALLOC=system']
  assert cpu[3][1][:2] == ['env', 'LD_PRELOAD=/lib/libtcmalloc.so.4']
  # A run past its deadline is stopped with its children (torch.compile's workers).
  log = io.StringIO()
  start = time.perf_counter()
  stopped = gpu_check.run('sleeper', ['bash', '-c', 'sleep 30 & sleep 30'], log, timeout=1)
  assert stopped['error'].startswith('stopped after 1 s') and time.perf_counter() - start < 10
  assert 'stopped after 1 s' in log.getvalue()
  best = gpu_check.fastest([{
      'train_images_per_sec': 5.0
  }, {
      'error': 'exit 1'
  }, {
      'train_images_per_sec': 7.0
  }])
  assert best['train_images_per_sec'] == 7.0
  assert best['train_images_per_sec_runs'] == [5.0, None, 7.0]


def test_benchmark_runs_without_tensorflow_and_clu(tmp_path):
  """The GPU machine has jax, flax, optax and orbax but no TensorFlow: the step benchmark must
  not need it (nor clu, whose writers import TensorFlow)."""
  for name in ('tensorflow', 'tensorflow_datasets', 'clu'):
    (tmp_path / f'{name}.py').write_text(f"raise ImportError('{name} is blocked by the test')\n")
  completed = subprocess.run([
      sys.executable, '-m', 'hml_jax.benchmark', '--config=configs/tiny.py', '--steps=1',
      '--input_images=0', '--config.eval_batch_size=16'
  ],
                             cwd=ROOT,
                             env=dict(os.environ,
                                      PYTHONPATH=f'{tmp_path}:{ROOT}',
                                      JAX_PLATFORMS='cpu'),
                             capture_output=True,
                             text=True)
  assert completed.returncode == 0, completed.stderr[-2000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result['train_images_per_sec'] > 0 and result['input_images_per_sec'] is None


def test_decode_benchmark_runs_without_tensorflow(tmp_path):
  """benchmarks/benchmark_decode.py times the 'pil' decoder's stage on a host without TensorFlow
  (the GPU machine): one row per thread count and the GIL bound, for each size."""
  for name in ('tensorflow', 'tensorflow_datasets', 'clu'):
    (tmp_path / f'{name}.py').write_text(f"raise ImportError('{name} is blocked by the test')\n")
  completed = subprocess.run([
      sys.executable, 'benchmarks/benchmark_decode.py', '--num_images=12', '--image_size=24,40',
      '--batch_size=4,2', '--threads=1,3', '--epochs=1'
  ],
                             cwd=ROOT,
                             env=dict(os.environ,
                                      PYTHONPATH=f'{tmp_path}:{ROOT}',
                                      JAX_PLATFORMS='cpu'),
                             capture_output=True,
                             text=True)
  assert completed.returncode == 0, completed.stderr[-2000:]
  lines = completed.stdout.splitlines()
  assert sum('-> 24x24, batches of 4' in line for line in lines) == 1
  assert sum('-> 40x40, batches of 2' in line for line in lines) == 1
  rows = [line.split('|') for line in lines if line.startswith('| 1 |') or line.startswith('| 3 |')]
  assert len(rows) == 4 and all(float(row[2]) > 0 for row in rows)
  assert sum('holding the GIL: about' in line for line in lines) == 2


def test_input_pipeline_benchmark_prints_a_row_per_decoder():
  completed = subprocess.run([
      sys.executable, 'benchmarks/benchmark_input_pipeline.py', '--num_images=12',
      '--image_size=24', '--batch_size=4', '--parallel_calls=1'
  ],
                             cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
                             capture_output=True,
                             text=True)
  assert completed.returncode == 0, completed.stderr[-2000:]
  rows = [
      line.split('|')
      for line in completed.stdout.splitlines()
      if line.startswith('| ') and not line.startswith('| decoder')
  ]
  assert [row[1].strip() for row in rows] == ['pil', 'tensorflow']
  assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)


def test_photo_folder_holds_out_one_validation_photo(tmp_path):
  """The pipeline benchmarks' dataset: num_images photos, one for test, one for validation, the
  rest timed; the config's decoder and parallel_calls reach the split. Too few photos is an
  error naming the count."""
  import pytest  # pylint: disable=g-import-not-at-top
  from hml_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  from hml_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top
  benchmark.write_photos(str(tmp_path), 6)
  config = benchmark.photo_folder_config(str(tmp_path),
                                         6,
                                         24,
                                         decoder='tensorflow',
                                         parallel_calls=1)
  data = input_pipeline.load(config)
  assert (len(data.train), len(data.validation), len(data.test)) == (4, 1, 1)
  assert data.train.decoder == 'tensorflow' and data.train.parallel_calls == 1
  assert benchmark.epoch_images_per_sec(data.train, 3, [1], transform=lambda x: x[:1]) > 0
  with pytest.raises(ValueError, match='input_images=2: .* at least 3'):
    benchmark.input_pipeline_rate(config, 2, 4)
  with pytest.raises(ValueError, match='input_images=0: '):
    benchmark.input_pipeline_rate(config, 0, 4)
  # The benchmark checks the count before its minutes of compiling and timing.
  with pytest.raises(ValueError, match='input_images=-1: '):
    benchmark.benchmark(None, input_images=-1)
