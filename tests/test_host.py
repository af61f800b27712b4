"""hml_jax.host: which malloc a process runs with, and the advice given on CPU."""
import os
import subprocess
import sys

import pytest

from hml_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_allocator_reads_the_mapped_libraries(tmp_path):
  maps = tmp_path / 'maps'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n')
  assert host.memory_allocator(str(maps)) == 'system'
  maps.write_text(maps.read_text() +
                  '7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n')
  assert host.memory_allocator(str(maps)) == 'tcmalloc'
  assert host.memory_allocator(str(tmp_path / 'missing')) == 'system'


def test_advice_names_the_installed_tcmalloc_or_how_to_install_it(monkeypatch):
  monkeypatch.setattr(host, 'memory_allocator', lambda: 'system')
  monkeypatch.setattr(host, 'installed_tcmalloc', lambda: '/usr/lib/libtcmalloc_minimal.so.4')
  if not os.path.exists('/proc/self/maps'):
    assert host.allocator_advice() == ''
    return
  assert 'LD_PRELOAD=/usr/lib/libtcmalloc_minimal.so.4' in host.allocator_advice()
  monkeypatch.setattr(host, 'installed_tcmalloc', lambda: '')
  assert 'apt install libtcmalloc-minimal4' in host.allocator_advice()
  monkeypatch.setattr(host, 'memory_allocator', lambda: 'tcmalloc')
  assert host.allocator_advice() == ''


@pytest.mark.slow
def test_a_preloaded_tcmalloc_is_detected():
  path = host.installed_tcmalloc()
  if not path:
    pytest.skip('tcmalloc is not installed here')
  completed = subprocess.run(
      [sys.executable, '-c', 'from hml_jax import host; print(host.memory_allocator())'],
      cwd=ROOT,
      env=dict(os.environ, LD_PRELOAD=path, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      check=True)
  assert completed.stdout.strip() == 'tcmalloc'


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
