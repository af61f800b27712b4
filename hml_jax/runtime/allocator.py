"""The malloc a process runs with, and the restart that gives the command-line tools a fast one.

XLA on CPU allocates a train step's temporaries afresh at every step. glibc's malloc hands large
freed blocks back to the kernel, so every step page-faults them in again: ResNet-50 at 224x224,
batch 16, 720k faults and 1.3 s of kernel time per step (docs/history.md, "glibc's
malloc keeping freed memory"). tcmalloc and TBB's scalable malloc keep freed blocks for the next
step. A malloc replacement must be in place before the process allocates anything, that is in
LD_PRELOAD when the process starts; so the command-line tools (`python -m hml_jax.main`, ...) call
restart_with_fast_allocator() first thing, which starts the same command again, once, with
LD_PRELOAD set to TBB's malloc from the `tbb` wheel that requirements.txt installs (or to an
installed tcmalloc where that wheel is missing). HML_JAX_MALLOC=system turns the restart off.

What gets preloaded runs inside every tool, so only the running interpreter's own installation is
trusted to name it: the `tbb` wheel's metadata is looked up in its site-packages (and the user
site where Python itself enables it), never on sys.path, which under `python -m` begins with the
working directory; and each library must resolve inside that installation's prefix. A program
read from stdin or given with -c is never restarted: the restarted process would find stdin
consumed, or repeat what the command did before the call.

Nothing here imports more than the standard library: it runs before JAX and TensorFlow load.
"""
import importlib.metadata
import importlib.util
import os
import site
import sys
import sysconfig

ENVIRONMENT_VARIABLE = 'HML_JAX_MALLOC'  # 'system': keep the process's malloc, no restart
# Set in the restarted process, so that it never restarts again (even if the preload failed).
RESTARTED_ENVIRONMENT_VARIABLE = 'HML_JAX_MALLOC_RESTARTED'

# TBB's malloc caches a freed large block only if it counts as "huge" (by default only above
# 64 MB); smaller large blocks go back to the kernel as glibc's do. At 1 MiB every block of a
# step's temporaries is kept: 2.8 faults per step instead of 129k at 64x64 batch 32, 27.2 img/s
# against tcmalloc's 26.4-27.0 and glibc's 24.0 (docs/history.md, measured 2026-12-03).
TBB_HUGE_SIZE_THRESHOLD_BYTES = 2**20
TBB_LIBRARIES = ('libtbbmalloc.so.2', 'libtbbmalloc_proxy.so.2')  # the malloc, then its proxy

# Where Linux distributions put tcmalloc (Debian/Ubuntu: apt install libtcmalloc-minimal4;
# Fedora/RHEL: gperftools-libs). launch/common.sh searches the same list.
TCMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4',
                  '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
                  '/usr/lib64/libtcmalloc_minimal.so.4', '/usr/lib/libtcmalloc_minimal.so.4')

# sys.argv[0] of programs that cannot be started again from their command line: '-c', and ''
# (stdin, or the interactive prompt) or '-' (`python - < script.py`), whose stdin is consumed.
UNRESTARTABLE_PROGRAMS = ('-c', '', '-')

# Accelerator backends: host memory is not a step's bottleneck there, so no restart.
ACCELERATOR_PACKAGES = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu')

# (file name prefix, name) of the malloc replacements; TBB's malloc alone (a library's own use of
# it) does not replace malloc, its proxy does.
_REPLACEMENTS = (
    ('libtcmalloc', 'tcmalloc'),
    ('libjemalloc', 'jemalloc'),
    ('libtbbmalloc_proxy', 'tbbmalloc'),
)


def _mapped_replacement(maps_path: str) -> tuple[str, str]:
  """(name, file) of the malloc replacement mapped into this process, ('system', '') if none or
  where /proc is missing."""
  try:
    with open(maps_path) as f:
      # address, permissions, offset, device, inode, then the file's path (if any)
      files = [fields[5] for fields in (line.split(maxsplit=5) for line in f) if len(fields) == 6]
  except OSError:
    return 'system', ''
  for library, name in _REPLACEMENTS:
    for file in files:
      if os.path.basename(file).startswith(library):
        return name, file.rstrip('\n')
  return 'system', ''


def memory_allocator(maps_path: str = '/proc/self/maps') -> str:
  """'tcmalloc', 'jemalloc', 'tbbmalloc' or 'system': the malloc this process runs with (from its
  mapped libraries; 'system' where /proc is missing)."""
  return _mapped_replacement(maps_path)[0]


def memory_allocator_file(maps_path: str = '/proc/self/maps') -> str:
  """The file of the malloc replacement this process runs with, or '' for the system's."""
  return _mapped_replacement(maps_path)[1]


def installed_tcmalloc() -> str:
  """The path of an installed tcmalloc, or ''."""
  return next((path for path in TCMALLOC_PATHS if os.path.exists(path)), '')


def trusted_installations() -> tuple[tuple[tuple[str, ...], str], ...]:
  """(site-packages folders, prefix) of the running interpreter's own installation schemes: its
  scheme (a virtual environment's, or the system's) and the user scheme where site enabled the
  user site (~/.local: Python already runs the .pth files there at every start, so trusting it
  adds nothing). Wheels put their data files, such as TBB's lib/*.so, under the prefix."""
  schemes = [sysconfig.get_paths()]
  if site.ENABLE_USER_SITE:
    schemes.append(sysconfig.get_paths(sysconfig.get_preferred_scheme('user')))
  return tuple((tuple(dict.fromkeys((paths['purelib'], paths['platlib']))), paths['data'])
               for paths in schemes)


def _inside(path: str, directory: str) -> bool:
  directory = os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


def tbb_libraries_in(site_packages, prefix: str) -> tuple[str, ...]:
  """The real paths of TBB's malloc and its proxy as the `tbb` wheel's RECORD in the folders
  site_packages lists them, or () where the wheel or either file is missing, or a file resolves
  (symbolic links followed) outside prefix."""
  for distribution in importlib.metadata.distributions(name='tbb', path=list(site_packages)):
    found = {}
    for file in distribution.files or ():
      if file.name in TBB_LIBRARIES:
        found[file.name] = os.path.realpath(file.locate())
    paths = tuple(found.get(name, '') for name in TBB_LIBRARIES)
    if all(path and _inside(path, prefix) and os.path.isfile(path) for path in paths):
      return paths
  return ()


def tbb_malloc_libraries() -> tuple[str, ...]:
  """The paths of TBB's malloc and its malloc-replacing proxy from the `tbb` wheel of the
  running interpreter's installation (trusted_installations; the wheel puts them in
  <prefix>/lib), or () where there is none."""
  for site_packages, prefix in trusted_installations():
    paths = tbb_libraries_in(site_packages, prefix)
    if paths:
      return paths
  return ()


def restartable(argv) -> bool:
  """Whether the program of sys.argv can be started again from its command line: not one read
  from stdin, typed at the prompt or given with -c (UNRESTARTABLE_PROGRAMS)."""
  return bool(argv) and argv[0] not in UNRESTARTABLE_PROGRAMS


def has_accelerator() -> bool:
  """Whether a GPU or TPU backend is installed, judged without importing JAX."""
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PACKAGES)


def restart_environment(environ, allocator: str, accelerator: bool, tbb_libraries,
                        tcmalloc: str) -> dict | None:
  """The environment to start this command again with a fast malloc, or None when it should
  run as it is: turned off (HML_JAX_MALLOC=system), already restarted, a fast malloc already
  loaded, an accelerator that will run the steps (unless JAX_PLATFORMS picks the CPU),
  or no fast malloc to load. Prefers TBB's from the wheel, else the installed tcmalloc."""
  if environ.get(ENVIRONMENT_VARIABLE, '').lower() == 'system':
    return None
  if environ.get(RESTARTED_ENVIRONMENT_VARIABLE) or allocator != 'system':
    return None
  if accelerator and not environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    return None
  preload = list(tbb_libraries) or ([tcmalloc] if tcmalloc else [])
  if not preload:
    return None
  environment = dict(environ)
  if environ.get('LD_PRELOAD'):
    preload.append(environ['LD_PRELOAD'])
  environment['LD_PRELOAD'] = ' '.join(preload)
  if tbb_libraries:
    environment.setdefault('TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD', str(TBB_HUGE_SIZE_THRESHOLD_BYTES))
  environment[RESTARTED_ENVIRONMENT_VARIABLE] = '1'
  return environment


def restart_with_fast_allocator() -> None:
  """Starts this command again with LD_PRELOAD set to a fast malloc (restart_environment says
  when; never off Linux, never a program from stdin or -c); returns only where it does not
  restart. Call it first thing in a command-line tool, before JAX or TensorFlow are imported: the
  process is replaced, and what it had done is lost."""
  if not sys.platform.startswith('linux') or not os.path.exists('/proc/self/maps'):
    return
  if not restartable(sys.argv):
    return
  environment = restart_environment(os.environ, memory_allocator(), has_accelerator(),
                                    tbb_malloc_libraries(), installed_tcmalloc())
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv is the command as typed, interpreter options and `-m module` included.
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environment)


def advice() -> str:
  """What to do on a CPU run with the system malloc (a notebook, or a process that could not
  restart), or '' when this process runs with a fast one (or is not on Linux, or was told
  HML_JAX_MALLOC=system)."""
  if (not os.path.exists('/proc/self/maps') or memory_allocator() != 'system' or
      os.environ.get(ENVIRONMENT_VARIABLE, '').lower() == 'system'):
    return ''
  environment = restart_environment({}, 'system', False, tbb_malloc_libraries(),
                                    installed_tcmalloc())
  if environment:
    settings = [f"LD_PRELOAD='{environment['LD_PRELOAD']}'"]
    if 'TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD' in environment:
      settings.append(
          f"TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD={environment['TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD']}")
    how = (f'start Python (or Jupyter) with {" ".join(settings)}; the command-line tools '
           '(python -m hml_jax.main ...) do this themselves')
  else:
    how = 'pip install tbb (or apt install libtcmalloc-minimal4) and run the command again'
  return ('Training on CPU with the system malloc: every step page-faults its temporaries in '
          f'again, 1.1-1.4x slower. For full speed {how}. HML_JAX_MALLOC=system silences this.')


if __name__ == '__main__':
  # python -m hml_jax.runtime.allocator: which malloc a command-line tool ends up with here, and its file.
  restart_with_fast_allocator()
  print(memory_allocator(), memory_allocator_file())
