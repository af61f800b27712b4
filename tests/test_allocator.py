"""hml_jax.runtime.allocator: which malloc a process runs with, and the restart to a fast one."""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from hml_jax.runtime import allocator

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


def test_the_mapped_replacement_and_its_file(tmp_path):
  maps = tmp_path / 'maps'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n'
                  '7f01-7f02 rw-p 0 00:00 0\n'
                  '7f02-7f03 r-xp 0 08:01 2 /opt/my dir/libtbbmalloc_proxy.so.2\n')
  assert allocator.memory_allocator(str(maps)) == 'tbbmalloc'
  assert allocator.memory_allocator_file(str(maps)) == '/opt/my dir/libtbbmalloc_proxy.so.2'
  maps.write_text('7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n')
  assert allocator.memory_allocator_file(str(maps)) == ''


def _clean_environment(**environment):
  environ = {
      key: value
      for key, value in os.environ.items()
      if key not in ('LD_PRELOAD', allocator.ENVIRONMENT_VARIABLE,
                     allocator.RESTARTED_ENVIRONMENT_VARIABLE, 'PYTHONSAFEPATH')
  }
  return dict(environ, PYTHONPATH=ROOT, **environment)


def run_allocator_module(cwd=ROOT, **environment):
  """What `python -m hml_jax.runtime.allocator` (a command-line tool's restart) ends up with, run in
  cwd: the malloc's name and its file ('system', '' for the system's)."""
  completed = subprocess.run([sys.executable, '-m', 'hml_jax.runtime.allocator'],
                             cwd=cwd,
                             env=_clean_environment(**environment),
                             capture_output=True,
                             text=True,
                             check=True)
  name, _, file = completed.stdout.strip().partition(' ')
  return name, file, completed.stderr


def test_restartable_programs():
  assert allocator.restartable(['/x/hml_jax/main.py', '--config=c.py'])
  for argv in (['-c'], ['-'], [''], []):  # -c, `python - < f`, `python < f` or the prompt
    assert not allocator.restartable(argv)


def test_only_the_interpreters_own_installation_is_trusted():
  installations = allocator.trusted_installations()
  folders = [folder for site_packages, _ in installations for folder in site_packages]
  assert installations[0][1] == sys.prefix  # the running interpreter's own prefix comes first
  assert os.getcwd() not in folders and '' not in folders
  if allocator.tbb_malloc_libraries():
    assert all(
        os.path.realpath(path).startswith(os.path.realpath(sys.prefix) + os.sep)
        for path in allocator.tbb_malloc_libraries())


def _plant_tbb_wheel(directory, record_lines):
  """A metadata-only `tbb` wheel in directory whose RECORD lists record_lines."""
  info = directory / 'tbb-9999.0.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: tbb\nVersion: 9999.0\n')
  (info / 'RECORD').write_text(''.join(f'{line},,\n' for line in record_lines))


def test_a_record_pointing_outside_the_prefix_is_refused(tmp_path):
  site_packages, prefix = tmp_path / 'prefix' / 'site-packages', tmp_path / 'prefix'
  site_packages.mkdir(parents=True)
  for name in allocator.TBB_LIBRARIES:
    (tmp_path / name).write_bytes(b'not a library')
    (prefix / name).write_bytes(b'stand-in')
  _plant_tbb_wheel(site_packages, [f'../../{name}' for name in allocator.TBB_LIBRARIES])
  assert allocator.tbb_libraries_in([str(site_packages)], str(prefix)) == ()
  os.symlink(tmp_path / allocator.TBB_LIBRARIES[0], site_packages / 'link.so.2')
  shutil.rmtree(site_packages / 'tbb-9999.0.dist-info')
  _plant_tbb_wheel(site_packages, ['link.so.2', f'../{allocator.TBB_LIBRARIES[1]}'])
  assert allocator.tbb_libraries_in([str(site_packages)], str(prefix)) == ()  # a link out
  shutil.rmtree(site_packages / 'tbb-9999.0.dist-info')
  _plant_tbb_wheel(site_packages, [f'../{name}' for name in allocator.TBB_LIBRARIES])
  assert allocator.tbb_libraries_in([str(site_packages)], str(prefix)) == tuple(
      str(prefix / name) for name in allocator.TBB_LIBRARIES)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_a_tbb_wheel_planted_in_the_working_directory_is_not_preloaded(tmp_path):
  """`python -m` puts the working directory first on sys.path; a metadata-only `tbb` wheel there
  whose RECORD names libraries in that directory must not be what the tool preloads."""
  real = allocator.tbb_malloc_libraries()
  for name, source in zip(allocator.TBB_LIBRARIES, real or ('',) * len(allocator.TBB_LIBRARIES)):
    if source:  # real libraries, so that a preload of them would succeed and show in the maps
      shutil.copyfile(source, tmp_path / name)
    else:
      (tmp_path / name).write_bytes(b'not a library')
  _plant_tbb_wheel(tmp_path, allocator.TBB_LIBRARIES)
  # The plant is well-formed: importlib.metadata finds it and its libraries in tmp_path.
  (planted,) = importlib.metadata.distributions(name='tbb', path=[str(tmp_path)])
  assert {os.path.dirname(os.path.realpath(f.locate())) for f in planted.files
         } == {os.path.realpath(tmp_path)}
  name, file, errors = run_allocator_module(cwd=str(tmp_path))
  assert str(tmp_path) not in file + errors  # neither mapped nor tried (ld.so names a failure)
  assert (name, file, errors) == run_allocator_module()  # the same as in a clean directory
  if real:
    assert (name, os.path.realpath(file)) == ('tbbmalloc', real[1])


def _run_program(arguments, stdin=None):
  return subprocess.run([sys.executable] + arguments,
                        cwd=ROOT,
                        env=_clean_environment(),
                        input=stdin,
                        capture_output=True,
                        text=True,
                        check=True).stdout


PROGRAM = ('import os\nfrom hml_jax import allocator\nallocator.restart_with_fast_allocator()\n'
           f'print("ran", os.environ.get({allocator.RESTARTED_ENVIRONMENT_VARIABLE!r}), '
           'allocator.memory_allocator())\n')


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
@pytest.mark.parametrize('arguments, from_stdin', [(['-'], True), ([], True),
                                                   (['-c', PROGRAM], False)])
def test_a_program_from_stdin_or_c_runs_without_a_restart(arguments, from_stdin, tmp_path):
  if not (allocator.tbb_malloc_libraries() or allocator.installed_tcmalloc()):
    pytest.skip('no fast malloc to restart with here')
  # A restart would have found stdin consumed (printing nothing) or set the restarted marker.
  assert _run_program(arguments, PROGRAM if from_stdin else None) == 'ran None system\n'
  # The same program as a file is restarted (the reference: a restart does happen here).
  script = tmp_path / 'program.py'
  script.write_text(PROGRAM)
  assert _run_program([str(script)]).split()[:2] == ['ran', '1']


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_a_command_restarts_with_the_wheels_tbb_malloc():
  if not allocator.tbb_malloc_libraries():
    pytest.skip(
        'the tbb wheel is not installed here (requirements.txt installs it on x86-64 Linux)')
  name, file, _ = run_allocator_module()
  assert (name, os.path.realpath(file)) == ('tbbmalloc', allocator.tbb_malloc_libraries()[1])
  assert run_allocator_module(HML_JAX_MALLOC='system')[:2] == ('system', '')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only')
def test_a_preloaded_tcmalloc_is_kept():
  path = allocator.installed_tcmalloc()
  if not path:
    pytest.skip('tcmalloc is not installed here')
  name, file, _ = run_allocator_module(LD_PRELOAD=path)
  assert (name, file) == ('tcmalloc', os.path.realpath(path))
