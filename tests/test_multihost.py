"""One device, eight devices, and two processes of four devices give the same training run.

Each run is the real CLI on the tiny config (same global batch of 16, so the same BatchNorm
statistics and updates up to the order of floating-point reductions). The two processes talk
through jax.distributed on localhost with CPU collectives (gloo) and share the workdir, as hosts
of a pod share a bucket.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def command(workdir, tfds_dir, *extra):
  return [sys.executable, '-m', 'hml_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.dataset.data_dir={tfds_dir}', *extra]


def environment(devices):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def assert_same_run(got, expected):
  for a, b in zip(got['epochs'], expected['epochs']):
    np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=2e-4)
    np.testing.assert_allclose([a['val_map'], a['test_map']], [b['val_map'], b['test_map']],
                               atol=0.05)  # percent
    np.testing.assert_allclose([a['scale'], a['margin']], [b['scale'], b['margin']], rtol=1e-4)


def test_one_eight_devices_and_two_processes_agree(tfds_dir, tmp_path):
  single = tmp_path / 'one_device'
  subprocess.run(command(single, tfds_dir), cwd=ROOT, env=environment(1), check=True,
                 capture_output=True)
  eight = tmp_path / 'eight_devices'
  subprocess.run(command(eight, tfds_dir), cwd=ROOT, env=environment(8), check=True,
                 capture_output=True)
  assert_same_run(results(eight), results(single))

  two = tmp_path / 'two_processes'
  port = free_port()
  processes = [subprocess.Popen(
      command(two, tfds_dir, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'), cwd=ROOT, env=environment(4), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert 'Process 1 of 2' in outputs[1][1]
  assert_same_run(results(two), results(eight))
  # One writer: process 0 wrote results.json; both saved the collective checkpoints.
  assert sorted(os.listdir(two / 'checkpoints')) == ['1', '2']
