"""Process setup shared by the command-line tools."""
from absl import logging


class _QuietLibraries:
  """Drops orbax's and TFDS's INFO lines (dozens per checkpoint); warnings still pass."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
    return record.levelno >= 30 or not noisy  # 30: Python's logging.WARNING


def setup():
  """Process setup shared by the command-line tools: quiet library logs, TensorFlow off the
  accelerator."""
  # ABSLHandler passes records straight to its python_handler, so the filter goes there.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  # TensorFlow is only used for TFDS on the host; it must not take the accelerator's memory.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
