import os

# Tests run on the CPU; keep TensorFlow (used by TFDS) quiet and off any accelerator.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One TFDS data_dir per test session; the tiny composite_digits is generated in it once."""
  return tmp_path_factory.mktemp('tensorflow_datasets')
