"""The TensorBoard event files: grouped tags, read back by TensorBoard's own reader, written
without TensorFlow (training/summaries.py)."""
import os
import subprocess
import sys

import pytest

from hml_jax.training import summaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(logdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(logdir))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_step_and_epoch_scalars_are_grouped():
  assert summaries.step_scalars({
      'loss': 1.0,
      'scale': 2.0,
      'first_nonfinite_gradient': 3
  }) == {
      'train/loss': 1.0,
      'adaptive/scale': 2.0
  }
  record = {
      'val_map': 50.0,
      'test_map': 40.0,
      'train_loss': 0.5,
      'epoch': 2,
      'false_negative_share': 0.1
  }
  assert summaries.epoch_scalars(record, 12.0) == {
      'val/map': 50.0,
      'test/map': 40.0,
      'train/loss_epoch': 0.5,
      'train/epoch': 2,
      'train/eta_seconds': 12.0,
      'train/false_negative_share': 0.1
  }


def test_event_writer_round_trips_through_tensorboard(tmp_path):
  writer = summaries.EventWriter(str(tmp_path))
  writer.write_hparams({'loss': 'hml', 'learning_rate': 1e-3, 'half_precision': False})
  writer.write_scalars(1, {'train/loss': 0.25, 'val/map': 50.5})
  writer.write_scalars(2, {'train/loss': 0.125})
  writer.close()
  assert read_scalars(tmp_path) == {
      'train/loss': [(1, 0.25), (2, 0.125)],
      'val/map': [(1, 50.5)],
  }


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = summaries.EventWriter(str(tmp_path / 'other'), enabled=False)
  writer.write_scalars(1, {'train/loss': 1.0})
  writer.write_hparams({'loss': 'an'})
  writer.close()
  assert not (tmp_path / 'other').exists()


def test_progress_reports_steps_per_second_and_uptime(tmp_path):
  written = []

  class Recorder:

    def write_scalars(self, step, scalars):
      written.append((step, scalars))

  report = summaries.ProgressReport(10, Recorder(), every_secs=60)
  start = report.started
  report(1, start + 1)  # the first call only starts the clock
  report(5, start + 30)  # too soon
  report(7, start + 62)
  report(8, start + 70)  # too soon again
  report(10, start + 80)  # the last step is always reported
  assert written == [(7, {
      'steps_per_sec': 6 / 61,
      'uptime': 62
  }), (10, {
      'steps_per_sec': 3 / 18,
      'uptime': 80
  })]


@pytest.mark.slow
def test_writing_events_imports_no_tensorflow(tmp_path):
  code = ('import sys; from hml_jax.training import summaries\n'
          f'w = summaries.EventWriter({str(tmp_path)!r}); w.write_scalars(1, {{"a/b": 1.0}})\n'
          'w.write_hparams({"x": 1}); w.close()\n'
          'print("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env={
                              **os.environ, 'PYTHONPATH': ROOT
                          },
                          capture_output=True,
                          text=True,
                          check=True)
  assert result.stdout.strip() == 'False'
  assert read_scalars(tmp_path) == {'a/b': [(1, 1.0)]}
