"""Faults injected on purpose: kills and preemption signals mid-epoch, corrupt checkpoints, a
failing disk, NaN losses and gradients, two runs on one workdir. Nothing beyond the last
checkpoint may be lost, and a resumed run must equal one that was never interrupted (bitwise on
CPU)."""
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hml_jax import methods, models
from hml_jax.runtime import errors
from hml_jax.state import checkpoints, train_state, workdir_files
from hml_jax.training import train
from tests.helpers import read_results, tiny_config

# Subprocesses, fault injection, several processes or notebooks: the fast tier skips them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 12  # tiny: 192 training images, batch 16


@pytest.fixture(scope='module')
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 3-epoch run of the tiny config."""
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  return workdir


def final_state(workdir):
  """The newest checkpoint's train state, every array as bytes (for exact comparison)."""
  _, _, state = train_state.load_trained_state(str(workdir), 'latest')
  return jax.tree_util.tree_map(lambda x: np.asarray(x).tobytes(), {
      'params': state.params,
      'stats': state.batch_stats,
      'opt': state.opt_state,
      'step': state.step
  })


def comparable_results(workdir):
  results = read_results(workdir)
  del results['config']['log_every_steps']  # only how often metrics are logged
  return results


def assert_equal_runs(workdir, reference_workdir):
  assert comparable_results(workdir) == comparable_results(reference_workdir)
  assert final_state(workdir) == final_state(reference_workdir)


def cli(workdir, tfds_dir, *extra):
  return [
      sys.executable, '-m', 'hml_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
      f'--config.dataset.data_dir={tfds_dir}', '--config.num_epochs=3',
      '--config.log_every_steps=1', *extra
  ]


def start_and_wait_for_epoch_2(command):
  """Starts the CLI; returns it once it is inside epoch 2 (epoch 1's checkpoint exists)."""
  process = subprocess.Popen(command,
                             cwd=ROOT,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE,
                             text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
  workdir = command[4].split('=', 1)[1]
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, 'checkpoints', '1')):
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  return process


def test_sigkill_at_a_random_step_resumes_bitwise(tfds_dir, tmp_path, reference):
  workdir = tmp_path / 'killed'
  command = cli(workdir, tfds_dir, '--verbosity=1')  # per-step lines on stderr
  target = random.Random().randint(STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH - 1)
  process = subprocess.Popen(command,
                             cwd=ROOT,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE,
                             text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
  for line in process.stderr:  # every step's metrics are logged as "[step] ..."
    if f'] [{target}] ' in line:
      process.send_signal(signal.SIGKILL)
      break
  process.wait()
  assert process.returncode == -signal.SIGKILL, f'never reached step {target}'
  assert not (workdir / 'results.json').exists()
  subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
  assert_equal_runs(workdir, reference)


# SIGTERM, what a preempted VM receives. SIGINT (Ctrl-C) goes to the same handler
# (test_faults ran both until 2026-12-03; one is kept for the suite's time).
@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143)])
def test_preemption_signal_saves_the_current_step_and_resumes_bitwise(tfds_dir, tmp_path, reference,
                                                                      signum, code):
  workdir = tmp_path / signal.Signals(signum).name
  command = cli(workdir, tfds_dir)
  process = start_and_wait_for_epoch_2(command)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == code, stderr[-3000:]
  saved = [int(step) for step in os.listdir(workdir / 'preempted') if step.isdigit()]
  assert len(saved) == 1 and saved[0] > STEPS_PER_EPOCH  # after epoch 1's checkpoint
  assert f'saved a checkpoint at step {saved[0]}' in stderr
  resumed = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
  epoch, done = (saved[0] - 1) // STEPS_PER_EPOCH + 1, (saved[0] - 1) % STEPS_PER_EPOCH + 1
  assert f'and {done} steps of epoch {epoch}' in resumed.stderr
  assert_equal_runs(workdir, reference)
  assert not os.listdir(workdir / 'preempted')  # removed once epoch 2 was saved


def test_a_finished_run_extended_by_more_epochs_is_the_longer_run(tfds_dir, tmp_path, reference):
  """num_epochs is resumable: a finished 2-epoch run continued to 3 is bitwise the 3-epoch run,
  and its config.json then records 3 (what an exported backbone names as its source config)."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=2), str(workdir))
  assert workdir_files.read_config(str(workdir)).num_epochs == 2
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  assert workdir_files.read_config(str(workdir)).num_epochs == 3
  assert_equal_runs(workdir, reference)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tfds_dir, tmp_path, reference,
                                                              caplog):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  newest = workdir / 'checkpoints' / '3'
  damaged = max((p for p in newest.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a crash mid-write
  os.remove(workdir / 'results.json')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  assert f'Checkpoint {newest} is unreadable' in caplog.text
  assert_equal_runs(workdir, reference)


def test_best_checkpoint_survives_retention(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3, checkpoints_to_keep=1),
                                     str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  assert os.listdir(workdir / 'best') == [str(results['best_epoch'])]


def test_failed_save_is_clear_and_the_previous_checkpoint_restores(tfds_dir, tmp_path, reference,
                                                                   monkeypatch):
  workdir = tmp_path / 'run'
  original = ocp.CheckpointManager.save

  def failing_save(manager, step, *args, **kwargs):
    if step == 2:
      raise OSError(28, 'No space left on device')
    return original(manager, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', failing_save)
  with pytest.raises(RuntimeError,
                     match=r'checkpoint of epoch 2 .*No space left on device.*'
                     r'epoch 1 .* is intact'):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  assert_equal_runs(workdir, reference)


def nan_method(kind):
  """'an' whose loss is NaN, or finite with NaN gradients (sqrt at 0)."""
  method = methods.get_method('an')

  def loss(logits, observed_labels):
    if kind == 'loss':
      return jnp.mean(logits) * jnp.nan
    return jnp.sqrt(jnp.abs(logits[0, 0] - jax.lax.stop_gradient(logits[0, 0])))

  return dataclasses.replace(method, loss=loss, hyperparameters=())


@pytest.mark.parametrize(
    'kind, message', [('loss', r'Step 1: the loss is NaN or Inf'),
                      ('gradient', r'Step 1: the gradient of model/backbone/\S+ is NaN or Inf')])
def test_nonfinite_step_stops_naming_it(tfds_dir, tmp_path, monkeypatch, kind, message):
  monkeypatch.setitem(methods.METHODS, 'an', nan_method(kind))
  with pytest.raises(FloatingPointError, match=message):
    train.train_and_evaluate(tiny_config(tfds_dir, loss='an', num_epochs=1), str(tmp_path / kind))
  assert not os.path.exists(tmp_path / kind / 'checkpoints' / '1')


def test_nonfinite_steps_can_be_skipped_and_counted(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, 'an', nan_method('loss'))
  config = tiny_config(tfds_dir, loss='an', num_epochs=1, nonfinite='skip')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['epochs'][0]['skipped_steps'] == STEPS_PER_EPOCH
  _, _, state = train_state.load_trained_state(str(tmp_path / 'run'), 'latest')
  model = models.create_model(config.model, 'linear', 10)
  initial = train_state.create_train_state(train_state.StateSettings.from_config(config), model,
                                           methods.get_method('an'), jax.random.key(config.seed),
                                           (32, 32, 1))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params),
                         jax.device_get(initial.params))  # no step was applied


def test_a_second_run_on_the_same_workdir_is_refused(tfds_dir, tmp_path, caplog):
  workdir = tmp_path / 'run'
  os.makedirs(workdir)
  with checkpoints.WorkdirLock(str(workdir)):
    with pytest.raises(RuntimeError, match=f'in use by process {os.getpid()}'):
      train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(workdir))
  # A lock left by a killed process on this host is taken over.
  (workdir / 'lock').write_text(f'{os.uname().nodename} 999999999\n')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(workdir))
  assert 'no longer running' in caplog.text and not (workdir / 'lock').exists()


def largest_file(step_dir):
  return max((p for p in step_dir.rglob('*') if p.is_file() and p.name != checkpoints.MANIFEST),
             key=lambda p: p.stat().st_size)


def flip_a_bit(path):
  """One bit flipped in the middle: the size stays, as after a disk or memory error."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_newest_checkpoint_falls_back_to_the_previous(
    tfds_dir, tmp_path, reference, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  newest = workdir / 'checkpoints' / '3'
  damaged = largest_file(newest)
  flip_a_bit(damaged)
  os.remove(workdir / 'results.json')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  assert f'Checkpoint {newest} is unreadable (CorruptCheckpointError: {damaged} has SHA-256' in (
      caplog.text)
  assert [name.split('_')[:2] for name in os.listdir(workdir / 'unreadable_checkpoints')
         ] == [['checkpoints', '3']]
  assert_equal_runs(workdir, reference)  # epoch 3 trained again from epoch 2, bitwise


def test_a_corrupt_best_checkpoint_is_refused_then_replaced_by_a_better_epoch(
    tfds_dir, tmp_path, reference, caplog):
  best_epoch = read_results(reference)['best_epoch']
  assert best_epoch > 1  # the tiny run improves after its first epoch
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=1), str(workdir))
  damaged = largest_file(workdir / 'best' / '1')
  flip_a_bit(damaged)
  with pytest.raises(errors.UserError, match=f'{damaged} has SHA-256 .*--checkpoint=latest'):
    train_state.load_trained_state(str(workdir), 'best')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(tiny_config(tfds_dir, num_epochs=3), str(workdir))
  assert f"The best checkpoint {workdir / 'best' / '1'} is damaged" in caplog.text
  assert os.listdir(workdir / 'best') == [str(best_epoch)]
  assert_equal_runs(workdir, reference)

  def best_state(workdir):
    return jax.tree_util.tree_map(lambda x: np.asarray(x).tobytes(),
                                  train_state.load_trained_state(str(workdir), 'best')[2].params)

  assert best_state(workdir) == best_state(reference)
