"""Workdir files: local paths are written atomically and durably; bucket URLs are never made
local; a damaged JSON file is named."""
import concurrent.futures
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from hml_jax.runtime import errors, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_json_round_trip_and_atomic_replace(tmp_path):
  path = str(tmp_path / 'a' / 'b.json')
  files.makedirs(tmp_path / 'a')
  files.write_json(path, {'x': [1, 2]})
  files.write_json(path, {'x': [3]})
  assert files.read_json(path) == {'x': [3]}
  assert files.listdir(tmp_path / 'a') == ['b.json']  # no temporary file left behind
  files.rename(path, str(tmp_path / 'a' / 'c.json'))
  assert files.exists(tmp_path / 'a' / 'c.json') and not files.exists(path)


def test_bucket_urls_stay_urls():
  assert not files.is_local('gs://bucket/run')
  assert files.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert files.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
  assert files.is_local('runs/x') and files.absolute('runs/x').startswith('/')


def test_a_write_is_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
  """What makes it survive a power loss: the data reaches the disk before the name points at
  it, and the new name reaches the disk after the rename."""
  events = []
  fsync, replace = os.fsync, os.replace

  def recording_fsync(descriptor):
    events.append(('fsync', os.readlink(f'/proc/self/fd/{descriptor}')))
    fsync(descriptor)

  def recording_replace(source, target):
    events.append(('replace', source, target))
    replace(source, target)

  monkeypatch.setattr(os, 'fsync', recording_fsync)
  monkeypatch.setattr(os, 'replace', recording_replace)
  path = str(tmp_path / 'config.json')
  files.write_json(path, {'a': 1})
  (_, temporary), *rest = events
  assert rest == [('replace', temporary, path), ('fsync', str(tmp_path))]
  assert os.path.dirname(temporary) == str(tmp_path)
  assert os.path.basename(temporary).startswith(f'config.json.{os.getpid()}.')
  assert files.read_json(path) == {'a': 1}


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / 'config.json')
  files.write_json(path, {'old': True})

  def full_disk(descriptor):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full_disk)
  with pytest.raises(OSError, match='No space left'):
    files.write_json(path, {'new': True})
  assert files.read_json(path) == {'old': True} and os.listdir(tmp_path) == ['config.json']


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
  path = str(tmp_path / 'results.json')
  values = [{'writer': i, 'data': list(range(2000))} for i in range(4)]

  def write_many(value):
    for _ in range(25):
      files.write_json(path, value)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(write_many, values))  # re-raises any writer's error
  assert files.read_json(path) in values and os.listdir(tmp_path) == ['results.json']


@pytest.mark.parametrize('content', [b'{"label_names": ["cat", "do', b'', b'\xff\xfe\x00garbage'])
def test_a_damaged_json_file_is_named(tmp_path, content):
  path = tmp_path / 'dataset.json'
  path.write_bytes(content)
  with pytest.raises(errors.InvalidInputError,
                     match=f'{path} is not valid JSON \\(truncated\\?\\): .*Restore it'):
    files.read_json(str(path))
  with pytest.raises(ValueError, match='do this'):  # the caller's advice, and still a ValueError
    files.read_json(str(path), 'do this')


# Rewrites the file between two versions as fast as it can, until killed.
REWRITER = r'''
import sys
from hml_jax.runtime import files
versions = [{'version': v, 'rows': [v] * 200000} for v in (1, 2)]
files.write_json(sys.argv[1], versions[0])
print('ready', flush=True)
i = 0
while True:
  i += 1
  files.write_json(sys.argv[1], versions[i % 2])
'''


@pytest.mark.slow
def test_a_process_killed_while_writing_leaves_a_whole_file(tmp_path):
  path = tmp_path / 'config.json'
  for _ in range(5):
    process = subprocess.Popen(
        [sys.executable, '-c', REWRITER, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert process.stdout.readline() == 'ready\n'
    time.sleep(random.uniform(0.05, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert files.read_json(str(path))['version'] in (1, 2)
