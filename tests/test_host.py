"""hml_jax.runtime.host: the compilation cache and process setup of the command-line tools."""
import os
import subprocess
import sys

import pytest

from hml_jax.runtime import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compilation_cache_follows_jax_then_the_environment_then_the_default(monkeypatch, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax_own'))
    assert host.use_compilation_cache() == str(tmp_path / 'jax_own')
    jax.config.update('jax_compilation_cache_dir', None)
    monkeypatch.setenv(host.COMPILATION_CACHE_ENVIRONMENT_VARIABLE, 'off')
    assert host.use_compilation_cache() == '' and not jax.config.jax_compilation_cache_dir
    chosen = tmp_path / 'chosen' / 'xla'
    monkeypatch.setenv(host.COMPILATION_CACHE_ENVIRONMENT_VARIABLE, str(chosen))
    assert host.use_compilation_cache() == str(chosen) and chosen.is_dir()
    jax.config.update('jax_compilation_cache_dir', None)
    monkeypatch.delenv(host.COMPILATION_CACHE_ENVIRONMENT_VARIABLE)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert host.use_compilation_cache() == str(tmp_path / 'xdg' / 'hml_jax' / 'xla')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_library_notes_are_dropped_and_warnings_kept():
  import logging  # pylint: disable=g-import-not-at-top

  def record(path, level, message):
    return logging.LogRecord('x', level, path, 1, message, None, None)

  quiet = host._QuietLibraries()  # pylint: disable=protected-access
  tfds = '/site-packages/tensorflow_datasets/core/utils/file_utils.py'
  assert not quiet.filter(record(tfds, logging.INFO, 'Load dataset info from %s'))
  assert not quiet.filter(
      record(tfds, logging.WARNING, 'Variant folder /d/x/1.0.0 has no dataset_info.json'))
  formatted = logging.LogRecord('x', logging.WARNING, tfds, 1, 'Variant folder %s has no %s',
                                ('/d/x/1.0.0', 'dataset_info.json'), None)
  assert not quiet.filter(formatted)  # as TFDS logs it: the name is an argument
  assert not quiet.filter(
      record(tfds, logging.WARNING, 'Found a different version of the requested dataset'))
  assert quiet.filter(record(tfds, logging.WARNING, 'Something else is wrong'))
  assert not quiet.filter(
      record('/site-packages/matplotlib/font_manager.py', logging.INFO,
             'generated new fontManager'))
  assert quiet.filter(record('/work/hml_jax/training/train.py', logging.INFO, 'Epoch 1/10: ...'))


def test_import_banners_are_dropped_and_other_lines_kept(capfd):
  import os  # pylint: disable=g-import-not-at-top
  with host.banners_dropped(('a banner',)):
    os.write(2, b'first line\nthis is a banner line\n')
    os.write(2, b'last line\n')
  captured = capfd.readouterr()
  assert captured.err == 'first line\nlast line\n'


@pytest.mark.slow
def test_tensorflow_is_imported_only_when_used_and_then_kept_off_the_accelerators():
  """host.setup imports no TensorFlow; the first import anywhere later drops its banners and
  hides the GPUs from it."""
  code = ('import sys; from hml_jax.runtime import host; host.setup(compilation_cache=False)\n'
          'print("tensorflow" in sys.modules)\n'
          'import tensorflow as tf\n'
          'print(tf.config.get_visible_devices("GPU"))')
  result = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env={
                              **os.environ, 'PYTHONPATH': ROOT,
                              'HML_JAX_MALLOC': 'system'
                          },
                          capture_output=True,
                          text=True,
                          check=True)
  assert result.stdout.split('\n')[:2] == ['False', '[]']
  assert not [b for b in host.IMPORT_BANNERS if b in result.stderr], result.stderr
