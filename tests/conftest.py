import os

# Tests run on the CPU; keep TensorFlow (used by TFDS) quiet and off any accelerator.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """One TFDS data_dir per test session; the tiny composite_digits is generated in it once."""
  return tmp_path_factory.mktemp('tensorflow_datasets')


# Absolute, as tests may change the working directory.
DURATIONS_FILE = os.path.abspath(
    os.environ['HML_TEST_DURATIONS']) if os.environ.get('HML_TEST_DURATIONS') else ''


def pytest_runtest_logreport(report):
  """HML_TEST_DURATIONS=FILE appends each test's call time to FILE as it finishes (so that an
  interrupted run still tells which tests are slow; tests/README in docs/development.md)."""
  path = DURATIONS_FILE
  if path and report.when in ('setup', 'call'):
    with open(path, 'a') as f:
      f.write(f'{report.duration:.2f}\t{report.when}\t{report.nodeid}\n')
