"""Coverage-guided fuzzing of hml_jax/init_from/pth_files.py with atheris (libFuzzer for Python).

Each input is a file's bytes, read by pth_files.read_state_dict. Anything but a PthFileError
crashes the run (atheris then writes the input to crash-<hash>, in /tmp/fuzz_pth_crashes unless
-artifact_prefix says otherwise), and so does a PthFileError that wraps an exception raised other
than by zipfile's parsing or the C unpickler (an assertion, an index past a storage, a recursion,
running out of memory: tests/test_pth_fuzz.py's hidden_bug), and an output that is not a dict
of str to arrays, each element of which is an element of one of the archive's storages, within
MAX_VIEW_FACTOR times their bytes (tests/test_pth_fuzz.py's check_loaded).

The mutations are libFuzzer's on the whole file, libFuzzer's on the pickle (the archive written
again with correct CRCs), and tests/test_pth_fuzz.py's mutate() (bit flips, truncations,
splices, pickle opcodes, entries, zip header fields). An empty (or missing) corpus directory is
first filled with the small valid archives and the hand-made hostile ones of that test file.

Needs atheris (pip install atheris; not a requirement of the project). From the repository root,
on one core:

  taskset -c 1 python tests/fuzz_pth.py -max_total_time=1500 -rss_limit_mb=2048 \\
      -max_len=65536 -print_final_stats=1 /tmp/pth_corpus

libFuzzer's options apply (-atheris_runs=N for a number of inputs, -runs=N, -jobs, ...); the
summary is its final '#N DONE cov: ... ft: ... rss: ...' line and stat::number_of_executed_units.
"""
import os
import random
import sys
import tempfile

import atheris
# Imported before the instrumented imports, so that only the reader and what it parses with
# (zipfile, pickletools) are instrumented.
import ml_dtypes  # noqa: F401  # pylint: disable=unused-import
import numpy  # noqa: F401  # pylint: disable=unused-import

sys.path[:0] = [
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'),
]
import hml_jax.runtime.errors  # noqa: F401,E402  # pylint: disable=g-import-not-at-top,wrong-import-position

with atheris.instrument_imports(include=['hml_jax.init_from.pth_files', 'zipfile', 'pickletools']):
  import pickletools  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
  from hml_jax.init_from import pth_files  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_pth_fuzz  # pylint: disable=g-import-not-at-top,wrong-import-position

_DIRECTORY = tempfile.mkdtemp(prefix='fuzz_pth_',
                              dir='/dev/shm' if os.path.isdir('/dev/shm') else None)
_PATH = os.path.join(_DIRECTORY, 'input.pth')
_SEEDS = []
_CRASHES = os.path.join(tempfile.gettempdir(), 'fuzz_pth_crashes')  # crash-<hash> files


def TestOneInput(data: bytes):  # pylint: disable=invalid-name
  """Reads `data` as a .pth file; raises on anything a hostile file must not cause."""
  with open(_PATH, 'wb') as f:
    f.write(data)
  try:
    loaded = pth_files.read_state_dict(_PATH)
  except pth_files.PthFileError as e:
    bug = test_pth_fuzz.hidden_bug(e)
    if bug is not None:
      raise RuntimeError(f'a bug behind: {e}') from bug
    return
  test_pth_fuzz.check_loaded(loaded, data)


def _mutate_pickle(data: bytes, max_size: int) -> bytes:
  entries = test_pth_fuzz._entries(data)  # pylint: disable=protected-access
  i = next(k for k, entry in enumerate(entries) if entry[0].endswith('/data.pkl'))
  name, content, method = entries[i]
  entries[i] = (name, atheris.Mutate(content, len(content) + 64), method)
  return test_pth_fuzz._zip(entries)[:max_size]  # pylint: disable=protected-access


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:  # pylint: disable=invalid-name
  rng = random.Random(seed)
  choice = rng.random()
  if choice < 0.6:
    try:
      if choice < 0.3:
        raise ValueError
      return _mutate_pickle(data, max_size)
    except Exception:  # pylint: disable=broad-except  # not an archive with a pickle
      return atheris.Mutate(data, max_size)
  return test_pth_fuzz.mutate(data, rng, _SEEDS)[:max_size]


def _fill_corpus(directory: str) -> None:
  """The seeds, one file each, where the corpus directory is empty."""
  os.makedirs(directory, exist_ok=True)
  if os.listdir(directory):
    return
  seeds = dict(test_pth_fuzz.valid_archives())
  for name, (data, _) in test_pth_fuzz.hostile_archives('pickled_code_ran').items():
    seeds[name] = data
  for name, data in seeds.items():
    if len(data) <= 2**16:
      with open(os.path.join(directory, name), 'wb') as f:
        f.write(data)


def main():
  if not any(arg.startswith('-artifact_prefix=') for arg in sys.argv):
    os.makedirs(_CRASHES, exist_ok=True)
    sys.argv.insert(1, f'-artifact_prefix={_CRASHES}/')
  corpora = [arg for arg in sys.argv[1:] if not arg.startswith('-')]
  if corpora:
    _fill_corpus(corpora[0])
  _SEEDS.extend(data for data in test_pth_fuzz.valid_archives().values())
  atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
  atheris.Fuzz()


if __name__ == '__main__':
  main()
