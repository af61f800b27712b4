import os

# Tests run on the CPU; keep TensorFlow (used by TFDS) quiet and off any accelerator.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# One persistent compilation cache per test session, shared with the subprocesses the tests
# start: most tests train the tiny config, and XLA's compile time is most of such a run (39 s
# cold, 16 s warm). Programs of any compile time are kept (JAX's default keeps those over 1 s).
# A session-own directory, so the suite never reads a stale cache from an earlier checkout.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='hml_jax_test_xla_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

# XLA's CPU backend spends most of a test's compile time in LLVM's optimization passes: at level
# 0 the tiny ResNet's three train steps and eval step compile 2.3 times faster (29 s against 67 s
# with the start-up), and the tests' programs run for seconds, not hours. Every test compares
# runs made at the same level, or to tolerances; users' runs keep XLA's default (level 3).
# HML_TEST_XLA_OPTIMIZATION=3 runs the suite at the default level.
XLA_OPTIMIZATION_FLAG = (
    f"--xla_backend_optimization_level={os.environ.get('HML_TEST_XLA_OPTIMIZATION', '0')}")
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_OPTIMIZATION_FLAG}".strip()

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
  # Under pytest-xdist the controller receives every worker's reports: it alone writes.
  if path and report.when in ('setup', 'call') and 'PYTEST_XDIST_WORKER' not in os.environ:
    with open(path, 'a') as f:
      f.write(f'{report.duration:.2f}\t{report.when}\t{report.nodeid}\n')


def pytest_sessionfinish(session, exitstatus):
  """Removes the session's compilation cache (made above; a user's JAX_COMPILATION_CACHE_DIR is
  theirs and stays)."""
  del exitstatus
  if hasattr(session.config, 'workerinput'):
    return  # a pytest-xdist worker: the controller removes the cache the workers share
  directory = os.environ.get('JAX_COMPILATION_CACHE_DIR', '')
  if os.path.basename(directory).startswith('hml_jax_test_xla_cache_'):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(directory, ignore_errors=True)
