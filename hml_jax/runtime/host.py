"""Process setup shared by the command-line tools."""
import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

from absl import logging

from hml_jax.runtime import allocator
from hml_jax.runtime import errors


class _QuietLibraries:
  """Drops orbax's and TFDS's INFO lines (dozens per checkpoint), clu's progress notes (the epoch
  line has them), JAX's note that it found no TPU (on every plain CPU run) and matplotlib's note
  that it built its font cache; warnings still pass, but for TFDS's about a dataset folder
  without dataset_info.json, which it prints while it prepares every new dataset, and about an
  older version of a dataset beside the one asked for (a new version is prepared beside it)."""

  def filter(self, record):
    noisy = any(part in record.pathname
                for part in ('/orbax/', '/tensorflow_datasets/', '/clu/platform/',
                             '/jax/_src/xla_bridge.py', '/matplotlib/'))
    if noisy and any(note in record.getMessage()
                     for note in ('has no dataset_info.json', 'Found a different version')):
      return False
    return record.levelno >= 30 or not noisy  # 30: Python's logging.WARNING


# What TensorFlow's C++ runtime prints at its import, on every run, before absl's logging starts
# (so TF_CPP_MIN_LOG_LEVEL does not reach it): the oneDNN notice and absl's preamble.
IMPORT_BANNERS = ('oneDNN custom operations are on',
                  'All log messages before absl::InitializeLog() is called')


@contextlib.contextmanager
def banners_dropped(banners=IMPORT_BANNERS):
  """Within: the process's stderr (file descriptor 2, where C++ libraries write) is collected;
  after, every line of it but those containing one of banners is written back, in order."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no stderr to filter (a daemon that closed it)
    yield
    return
  with tempfile.TemporaryFile() as collected:
    os.dup2(collected.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      collected.seek(0)
      kept = [
          line for line in collected.read().decode(errors='replace').splitlines(keepends=True)
          if not any(banner in line for banner in banners)
      ]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


# HML_JAX_COMPILATION_CACHE=DIR (or 'off'): where compiled programs are kept between runs.
COMPILATION_CACHE_ENVIRONMENT_VARIABLE = 'HML_JAX_COMPILATION_CACHE'


def default_compilation_cache() -> str:
  """~/.cache/hml_jax/xla (or under $XDG_CACHE_HOME)."""
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache_home, 'hml_jax', 'xla')


def use_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache, so that a program compiled once (the train and
  evaluation steps, the initializers) is read back by every later run of the same shapes:
  resuming, the seeds and methods of a comparison, predict after train. On 2 CPU cores the tiny
  test config's run takes 39 s cold and 16 s warm, most of the difference XLA's compile time
  (docs/performance.md "Compile time and the compilation cache"). JAX's own setting (JAX_COMPILATION_CACHE_DIR) wins;
  else HML_JAX_COMPILATION_CACHE=DIR, or 'off'; else default_compilation_cache(). Returns the
  directory in use, or ''."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  directory = os.environ.get(COMPILATION_CACHE_ENVIRONMENT_VARIABLE, default_compilation_cache())
  if directory.lower() in ('', 'off', '0', 'none'):
    return ''
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    logging.warning('No compilation cache (%s: %s); every run compiles afresh.', directory, error)
    return ''
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory


def setup(compilation_cache: bool = True):
  """Process setup shared by the command-line tools: quiet library logs, TensorFlow (when
  something imports it) quiet and off the accelerator, the persistent compilation cache (use_compilation_cache; benchmarks that time
  the compiler pass False), advice on the allocator on CPU where the process runs with the
  system's malloc (allocator.py: the command-line tools restart themselves with a fast one)."""
  # ABSLHandler passes records straight to its python_handler, so the filter goes there.
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())
  if compilation_cache:
    use_compilation_cache()
  if not allocator.has_accelerator():
    advice = allocator.advice()
    if advice:
      logging.warning(advice)
  configure_tensorflow_on_import()
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    # A machine that only runs the steps (hml_jax.benchmark on a GPU box without TFDS):
    # whatever reads data imports it itself and fails there with the missing module's name.
    return
  tfds.disable_progress_bar()


class _TensorFlowOnImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` as usual and has its import, whenever something first imports it (TFDS
  reading a dataset, the 'tensorflow' decoder), drop its banners and keep it off the
  accelerators: TensorFlow is only used on the host, for data, and is not imported at all on
  the paths that do not need it."""

  finding = False

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name != 'tensorflow' or self.finding:
      return None
    # Not removed here: TFDS probes with importlib.util.find_spec before it imports.
    self.finding = True
    try:
      spec = importlib.util.find_spec(name)
    finally:
      self.finding = False
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module
    finder = self

    def exec_and_configure(module):
      if finder in sys.meta_path:
        sys.meta_path.remove(finder)
      with banners_dropped():
        exec_module(module)
      module.config.set_visible_devices([], 'GPU')

    spec.loader.exec_module = exec_and_configure
    return spec


def configure_tensorflow_on_import() -> None:
  """_TensorFlowOnImport, once per process (or, if TensorFlow is imported already, its effect)."""
  if 'tensorflow' in sys.modules:
    sys.modules['tensorflow'].config.set_visible_devices([], 'GPU')
  elif not any(isinstance(finder, _TensorFlowOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TensorFlowOnImport())


def initialize_distributed(coordinator_address: str = '',
                           num_processes: int = 0,
                           process_id: int = -1) -> None:
  """jax.distributed.initialize for multi-process training; a no-op for one process.

  Arguments, else the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID. With none of them, nothing happens (one process), except on a Cloud TPU pod
  slice with HML_MULTIHOST=1, where JAX detects everything itself. Must run before anything
  touches the devices. On CPUs the processes talk through gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '0'))
  if process_id < 0:
    process_id = int(os.environ.get('JAX_PROCESS_ID', '-1'))
  if os.environ.get('HML_MULTIHOST') == '1' and not coordinator_address:
    jax.distributed.initialize()  # TPU pods (and SLURM, ...): detected by JAX
    return
  if not coordinator_address and num_processes <= 1:
    return
  if not coordinator_address or num_processes <= 1 or not 0 <= process_id < num_processes:
    raise errors.InvalidInputError(
        'Multi-process training needs --coordinator_address=HOST:PORT, --num_processes=N > 1 '
        f'and --process_id in [0, N) (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, '
        f'JAX_PROCESS_ID); got {coordinator_address!r}, {num_processes}, {process_id}.')
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu') or not allocator.has_accelerator():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info('Process %d of %d (coordinator %s).', process_id, num_processes, coordinator_address)
