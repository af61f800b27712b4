"""hml_jax.allocator: which malloc a process runs with, and the restart to a fast one."""
import os
import subprocess
import sys

import pytest

from hml_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TBB = ('/venv/lib/libtbbmalloc.so.2', '/venv/lib/libtbbmalloc_proxy.so.2')


def test_memory_allocator_reads_the_mapped_libraries(tmp_path):
  maps = tmp_path / 'maps'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n')
  assert allocator.memory_allocator(str(maps)) == 'system'
  # TBB's malloc alone (a library's own use of it) does not replace malloc; its proxy does.
  maps.write_text(maps.read_text() + '7f02-7f03 r-xp 0 08:01 2 /venv/lib/libtbbmalloc.so.2\n')
  assert allocator.memory_allocator(str(maps)) == 'system'
  with open(maps, 'a') as f:
    f.write('7f04-7f05 r-xp 0 08:01 3 /venv/lib/libtbbmalloc_proxy.so.2\n')
  assert allocator.memory_allocator(str(maps)) == 'tbbmalloc'
  maps.write_text('7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n')
  assert allocator.memory_allocator(str(maps)) == 'tcmalloc'
  assert allocator.memory_allocator(str(tmp_path / 'missing')) == 'system'


def test_restart_environment_preloads_tbb_before_what_was_preloaded():
  environment = allocator.restart_environment({
      'PATH': '/bin',
      'LD_PRELOAD': '/mine.so'
  },
                                              'system',
                                              accelerator=False,
                                              tbb_libraries=TBB,
                                              tcmalloc='/usr/lib/libtcmalloc_minimal.so.4')
  assert environment['LD_PRELOAD'] == ' '.join(TBB) + ' /mine.so'
  assert environment['TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD'] == str(2**20)
  assert environment[allocator.RESTARTED_ENVIRONMENT_VARIABLE] == '1'
  assert environment['PATH'] == '/bin'
  # A user's own TBB threshold wins.
  environment = allocator.restart_environment({'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD': '7'}, 'system',
                                              False, TBB, '')
  assert environment['TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD'] == '7'


def test_restart_environment_falls_back_to_tcmalloc_without_the_tbb_wheel():
  environment = allocator.restart_environment({}, 'system', False, (), '/lib/libtcmalloc.so.4')
  assert environment['LD_PRELOAD'] == '/lib/libtcmalloc.so.4'
  assert 'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD' not in environment


@pytest.mark.parametrize(
    'environ, running, accelerator, tbb, tcmalloc',
    [
        ({
            'HML_JAX_MALLOC': 'system'
        }, 'system', False, TBB, ''),  # turned off
        ({
            allocator.RESTARTED_ENVIRONMENT_VARIABLE: '1'
        }, 'system', False, TBB, ''),  # restarts once only
        ({}, 'tcmalloc', False, TBB, ''),  # a fast malloc is already loaded
        ({}, 'tbbmalloc', False, TBB, ''),
        ({}, 'system', True, TBB, ''),  # a GPU or TPU runs the steps
        ({}, 'system', False, (), ''),  # nothing to load
    ])
def test_no_restart(environ, running, accelerator, tbb, tcmalloc):
  assert allocator.restart_environment(environ, running, accelerator, tbb, tcmalloc) is None


def test_restart_on_an_accelerator_machine_told_to_use_the_cpu():
  assert allocator.restart_environment({'JAX_PLATFORMS': 'cpu'}, 'system', True, TBB, '')


def test_advice_names_what_to_do(monkeypatch):
  if not os.path.exists('/proc/self/maps'):
    assert allocator.advice() == ''
    return
  monkeypatch.delenv(allocator.ENVIRONMENT_VARIABLE, raising=False)
  monkeypatch.setattr(allocator, 'memory_allocator', lambda: 'system')
  monkeypatch.setattr(allocator, 'tbb_malloc_libraries', lambda: ())
  monkeypatch.setattr(allocator, 'installed_tcmalloc', lambda: '')
  assert 'pip install tbb' in allocator.advice()
  monkeypatch.setattr(allocator, 'tbb_malloc_libraries', lambda: TBB)
  assert f"LD_PRELOAD='{' '.join(TBB)}' TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD=1048576" in (
      allocator.advice())
  monkeypatch.setenv(allocator.ENVIRONMENT_VARIABLE, 'system')
  assert allocator.advice() == ''
  monkeypatch.delenv(allocator.ENVIRONMENT_VARIABLE)
  monkeypatch.setattr(allocator, 'memory_allocator', lambda: 'tbbmalloc')
  assert allocator.advice() == ''


def run_allocator_module(**environment):
  """What `python -m hml_jax.allocator` (a command-line tool's restart) ends up with."""
  environ = {
      key: value
      for key, value in os.environ.items()
      if key not in ('LD_PRELOAD', allocator.ENVIRONMENT_VARIABLE,
                     allocator.RESTARTED_ENVIRONMENT_VARIABLE)
  }
  completed = subprocess.run([sys.executable, '-m', 'hml_jax.allocator'],
                             cwd=ROOT,
                             env=dict(environ, PYTHONPATH=ROOT, **environment),
                             capture_output=True,
                             text=True,
                             check=True)
  return completed.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_a_command_restarts_with_the_wheels_tbb_malloc():
  if not allocator.tbb_malloc_libraries():
    pytest.skip(
        'the tbb wheel is not installed here (requirements.txt installs it on x86-64 Linux)')
  assert run_allocator_module() == 'tbbmalloc'
  assert run_allocator_module(HML_JAX_MALLOC='system') == 'system'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_a_preloaded_tcmalloc_is_kept():
  path = allocator.installed_tcmalloc()
  if not path:
    pytest.skip('tcmalloc is not installed here')
  assert run_allocator_module(LD_PRELOAD=path) == 'tcmalloc'
