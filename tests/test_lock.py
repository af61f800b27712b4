"""The workdir lock: one run per workdir, and a dead run's lock taken over by exactly one."""
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hml_jax.runtime import errors
from hml_jax.state import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()
DEAD_PID = 999999999  # above any pid_max: no such process

# A process that takes the lock when told, at the moment told (a barrier on the clock), says
# whether it got it, and lets it go when told.
WORKER = r'''
import sys, time
from hml_jax.state import checkpoints
lock = None
print('ready', flush=True)
for line in sys.stdin:
  command = line.split()
  if command[0] == 'go':
    while time.time() < float(command[1]):
      pass
    lock = checkpoints.WorkdirLock(sys.argv[1])
    try:
      lock.__enter__()
      print('won', flush=True)
    except checkpoints.WorkdirInUseError as error:
      lock = None
      print('lost', error, flush=True)
  elif command[0] == 'release':
    if lock:
      lock.__exit__(None, None, None)
    print('released', flush=True)
'''

STALE_LOCKS = {
    'dead process': f'{HOST} {DEAD_PID}\n'.encode(),
    'empty': b'',  # killed between creating and writing it
    'garbage': b'\x00\xff\xfe garbage',
}


def test_a_held_lock_refuses_a_second_run_naming_its_holder(tmp_path):
  with checkpoints.WorkdirLock(str(tmp_path)):
    assert (tmp_path / 'lock').read_text() == f'{HOST} {os.getpid()}\n'
    with pytest.raises(checkpoints.WorkdirInUseError,
                       match=f'{tmp_path} is in use by process {os.getpid()} on {HOST}'):
      checkpoints.WorkdirLock(str(tmp_path)).__enter__()
  assert not (tmp_path / 'lock').exists()
  with checkpoints.WorkdirLock(str(tmp_path)):  # free again
    pass
  assert issubclass(checkpoints.WorkdirInUseError, errors.UserError)


@pytest.mark.parametrize('kind', sorted(STALE_LOCKS))
def test_a_stale_lock_is_taken_over(tmp_path, caplog, kind):
  (tmp_path / 'lock').write_bytes(STALE_LOCKS[kind])
  with caplog.at_level('WARNING'):
    with checkpoints.WorkdirLock(str(tmp_path)):
      assert (tmp_path / 'lock').read_text() == f'{HOST} {os.getpid()}\n'
  assert f'Taking over {tmp_path / "lock"}' in caplog.text
  if kind == 'dead process':
    assert f'left by process {DEAD_PID}, which is no longer running' in caplog.text
  assert not (tmp_path / 'lock').exists()


def test_a_lock_of_another_host_is_left_alone(tmp_path):
  (tmp_path / 'lock').write_text('some-other-host 1234\n')
  with pytest.raises(checkpoints.WorkdirInUseError,
                     match='in use by process 1234 on some-other-host .*delete the lock file'):
    checkpoints.WorkdirLock(str(tmp_path)).__enter__()
  assert (tmp_path / 'lock').read_text() == 'some-other-host 1234\n'


def test_a_lock_that_cannot_be_opened_is_a_user_error(tmp_path):
  os.makedirs(tmp_path / 'lock')
  with pytest.raises(errors.InvalidInputError, match=f'Cannot open the lock file {tmp_path}/lock'):
    checkpoints.WorkdirLock(str(tmp_path)).__enter__()


def test_without_file_locks_the_exclusive_create_is_the_lock(tmp_path, monkeypatch, caplog):

  def no_flock(*args):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_flock)
  with caplog.at_level('WARNING'):
    with checkpoints.WorkdirLock(str(tmp_path)):
      with pytest.raises(checkpoints.WorkdirInUseError,
                         match=f'in use by process {os.getpid()} .*no file locks'):
        checkpoints.WorkdirLock(str(tmp_path)).__enter__()
  assert 'has no file locks' in caplog.text and not (tmp_path / 'lock').exists()
  (tmp_path / 'lock').write_text(f'{HOST} {DEAD_PID}\n')  # never taken over without flocks
  with pytest.raises(checkpoints.WorkdirInUseError, match=f'process {DEAD_PID}'):
    checkpoints.WorkdirLock(str(tmp_path)).__enter__()


def start_worker(workdir, log):
  process = subprocess.Popen(
      [sys.executable, '-c', WORKER, str(workdir)],
      cwd=ROOT,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=log,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert process.stdout.readline() == 'ready\n'
  return process


def tell(process, line):
  process.stdin.write(line + '\n')
  process.stdin.flush()


@pytest.mark.slow
def test_two_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
  workdir = tmp_path / 'run'
  os.makedirs(workdir)
  with open(tmp_path / 'workers.log', 'w') as log:
    workers = [start_worker(workdir, log) for _ in range(2)]
  try:
    kinds = sorted(STALE_LOCKS)
    for round_ in range(21):
      (workdir / 'lock').write_bytes(STALE_LOCKS[kinds[round_ % len(kinds)]])
      start = time.time() + 0.05
      for worker in workers:
        tell(worker, f'go {start}')
      answers = [worker.stdout.readline() for worker in workers]
      winners = [w for w, answer in zip(workers, answers) if answer == 'won\n']
      assert len(winners) == 1, (round_, answers)
      (loser,) = [answer for answer in answers if answer != 'won\n']
      assert f'in use by process {winners[0].pid} on {HOST}' in loser, (round_, loser)
      assert (workdir / 'lock').read_text() == f'{HOST} {winners[0].pid}\n'
      if round_ < 20:
        for worker in workers:
          tell(worker, 'release')
        assert [worker.stdout.readline() for worker in workers] == ['released\n'] * 2
        assert not (workdir / 'lock').exists()
    # The last winner is killed holding the lock: the kernel releases it, and it is taken over.
    winners[0].send_signal(signal.SIGKILL)
    winners[0].wait()
    with checkpoints.WorkdirLock(str(workdir)):
      assert (workdir / 'lock').read_text() == f'{HOST} {os.getpid()}\n'
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()
