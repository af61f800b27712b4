"""What a run writes to TensorBoard, by group: train/ (the step's loss and its parts, the gradient
norm, skipped steps, per epoch the mean loss, the ETA and the false negatives of paper Fig. 2),
adaptive/ (s*, m*, the gradient-balance term of Eq. 6 and the accumulated positive and negative
pulls of Fig. 3), val/ and test/ (mAP per epoch); and ProgressReport's steps_per_sec and uptime.

EventWriter writes the event files without TensorFlow (tensorboardX's writer; clu's writers and
the tensorboard package's own import TensorFlow wherever it is installed), on a local disk or a
bucket (gs://, through etils.epath as the other workdir files)."""
import io
import time
from typing import Dict, Mapping, Optional

from absl import logging

from hml_jax.runtime import files

# Step metrics of the adaptive half of HML (and the gradient pulls every method logs, Fig. 3).
ADAPTIVE_KEYS = ('scale', 'margin', 'gradient_balance', 'positive_gradient', 'negative_gradient')
# Diagnostics of the step that are not summaries of it (the index of a non-finite gradient).
NOT_WRITTEN = ('first_nonfinite_gradient',)


def step_scalars(metrics: Mapping[str, float]) -> Dict[str, float]:
  """{'loss': ..., 'scale': ...} of one train step -> {'train/loss': ..., 'adaptive/scale': ...}."""
  return {
      f"{'adaptive' if key in ADAPTIVE_KEYS else 'train'}/{key}": value
      for key, value in metrics.items()
      if key not in NOT_WRITTEN
  }


def epoch_scalars(record: Mapping, eta_seconds: float) -> Dict[str, float]:
  """An epoch's record (results.json's) -> val/map, test/map, train/loss_epoch, train/epoch,
  train/eta_seconds and, when measured, train/false_negative_*."""
  scalars = {
      'val/map': record['val_map'],
      'test/map': record['test_map'],
      'train/loss_epoch': record['train_loss'],
      'train/epoch': record['epoch'],
      'train/eta_seconds': eta_seconds,
  }
  scalars.update({
      f'train/{key}': value for key, value in record.items() if key.startswith('false_negative')
  })
  return scalars


class _BucketEventFile:
  """An event file in a bucket (no appends there): the bytes so far, written whole at each
  flush, as TensorFlow's own GCS files do."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    files.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """tensorboardX's writer factory for gs:// paths (instead of its google-cloud-storage one)."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # a bucket needs no folders


class EventWriter:
  """TensorBoard event files in a workdir: write_scalars(step, {tag: value}), write_hparams,
  flush, close. Disabled (on every process but the first), it writes nothing. With
  log_scalars (--verbosity=1), every scalar reaches the log too."""

  def __init__(self, workdir: str, enabled: bool = True, log_scalars: bool = False):
    self.log_scalars, self.writer = log_scalars, None
    if enabled:
      # Imported here: only a training run needs it.
      from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      record_writer.register_writer_factory('gs', _BucketEventFiles())
      self.writer = SummaryWriter(logdir=workdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.log_scalars:
      logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))
    if self.writer is not None:
      for tag, value in scalars.items():
        self.writer.add_scalar(tag, float(value), step)

  def write_hparams(self, hparams: Mapping[str, object]) -> None:
    """The run's config values (numbers, strings, bools), TensorBoard's HPARAMS tab."""
    if self.writer is None:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    for proto in summary.hparams(dict(hparams), {}):
      self.writer._get_file_writer().add_summary(proto)  # pylint: disable=protected-access

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class ProgressReport:
  """report(step, t): steps_per_sec (since the last report) and uptime (seconds since this was
  made), written every every_secs and at the last step, num_train_steps."""

  def __init__(self, num_train_steps: int, writer: EventWriter, every_secs: float = 60.0):
    self.num_train_steps, self.writer, self.every_secs = num_train_steps, writer, every_secs
    self.started = time.time()
    self.previous: Optional[tuple] = None  # (step, t) of the last report, or of the first call

  def __call__(self, step: int, t: float) -> None:
    if self.previous is None:
      self.previous = (step, t)
      return
    last_step, last_t = self.previous
    if step != last_step and t > last_t and (step == self.num_train_steps or
                                             t - last_t > self.every_secs):
      self.writer.write_scalars(step, {
          'steps_per_sec': (step - last_step) / (t - last_t),
          'uptime': t - self.started
      })
      self.previous = (step, t)
