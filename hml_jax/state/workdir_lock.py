"""The workdir lock: one run per workdir at a time, by flock(2) on workdir/lock, the holder's host
and process written in it so that a refusal names who holds it (WorkdirLock below;
hml_jax/state/checkpoints.py re-exports it)."""
import errno
import fcntl
import os
import socket
import time

from absl import logging

from hml_jax.runtime import errors
from hml_jax.runtime import files


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lock (or left it on another host)."""


# flock(2) fails with these where the filesystem has no file locks (some NFS, FUSE, SMB mounts).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class WorkdirLock:
  """workdir/lock while a run trains there: a second run on the same workdir is refused instead
  of both writing.

  The lock is an flock(2) on the file, held for the run's lifetime; the file names the holder's
  host and process for the message. The kernel releases the flock of a process that ends in any
  way, so taking over the lock of a killed run is the same atomic flock call (of two runs racing
  for it exactly one gets it), whatever the file holds: a name, nothing (a run killed between
  creating and writing it) or garbage. A lock file that names another host is not taken over:
  where a filesystem keeps flocks per host, that run may still be alive; its lock is removed by
  hand after checking. Where the filesystem has no flocks at all, creating the file is the lock
  (with a warning) and a lock left behind is removed by hand too.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self.host = socket.gethostname()
    self.owner = f'{self.host} {os.getpid()}'
    self._descriptor = None

  def _holder(self):
    """(host, pid) that the lock file names, or None (absent, empty, garbage)."""
    try:
      with open(self.path, 'rb') as f:
        host, pid = f.read(4096).decode('utf-8').split()[:2]
      return host, int(pid)
    except (OSError, ValueError):
      return None

  def _holder_soon(self, seconds: float = 2.0):
    """The holder that the lock file names, waiting a moment for a run that has just taken the
    flock to write its name over the name of the dead run it took it from (or into an empty
    file)."""
    deadline = time.monotonic() + seconds
    while True:
      holder = self._holder()
      if (holder and (holder[0] != self.host or _process_alive(holder[1])) or
          time.monotonic() > deadline):
        return holder
      time.sleep(0.02)

  def _in_use(self, holder, note=''):
    who = f'process {holder[1]} on {holder[0]}' if holder else 'another run'
    return WorkdirInUseError(f'{os.path.dirname(self.path)} is in use by {who} ({self.path}); '
                             f'two runs must not share a workdir.{note} Wait for it, use another '
                             '--workdir, or delete the lock file if that run is gone.')

  def _open(self):
    """(descriptor, whether this call created the file); None if it vanished meanwhile."""
    try:
      try:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
      except FileExistsError:
        return os.open(self.path, os.O_RDWR), False
    except FileNotFoundError:
      return None  # removed by the run that held it, between the two opens
    except OSError as error:
      raise errors.InvalidInputError(f'Cannot open the lock file {self.path} ({error}); make it '
                                     'and the workdir writable for this user, or use another '
                                     '--workdir.') from None

  def __enter__(self):
    if not files.is_local(self.path):
      # Object stores have no exclusive create here: one run per bucket workdir is up to you.
      logging.warning('No lock on %s: make sure no other run uses this workdir.', self.path)
      return self
    for _ in range(100):  # a retry only when the file was removed or replaced meanwhile
      opened = self._open()
      if opened is None:
        continue
      descriptor, created = opened
      try:
        if self._lock(descriptor, created):
          self._descriptor = descriptor
          return self
      except BaseException:
        os.close(descriptor)
        raise
      os.close(descriptor)
    raise RuntimeError(f'Could not take {self.path}: it kept being replaced.')

  def _lock(self, descriptor, created) -> bool:
    """Takes the lock through descriptor (True), or False to start again (the file was replaced
    meanwhile); raises WorkdirInUseError if another run holds it."""
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise self._in_use(self._holder_soon()) from None
    except OSError as error:
      if error.errno not in _NO_FLOCK:
        raise
      return self._lock_without_flock(descriptor, created, error)
    if not _same_file(descriptor, self.path):
      return False  # its holder removed it after we opened it: that inode locks nothing
    content = os.pread(descriptor, 4096, 0)
    if content or not created:
      self._take_over(content)
    _write_owner(descriptor, self.owner)
    return True

  def _take_over(self, content: bytes) -> None:
    """Logs whose lock is taken over; refuses (raises) one that names another host."""
    holder = self._holder_from(content)
    if holder is None:
      logging.warning('Taking over %s, which names no run (%r): a run stopped while taking it.',
                      self.path, content[:60])
    elif holder[0] != self.host:
      raise self._in_use(
          holder, f' It may run on {holder[0]} (a lock on another host cannot be '
          'checked from here).')
    else:  # the kernel says no process holds it: a live process of that number is another one
      logging.warning('Taking over %s, left by process %d, which is no longer %s.', self.path,
                      holder[1], 'holding it' if _process_alive(holder[1]) else 'running')

  @staticmethod
  def _holder_from(content: bytes):
    try:
      host, pid = content.decode('utf-8').split()[:2]
      return host, int(pid)
    except ValueError:  # also UnicodeDecodeError
      return None

  def _lock_without_flock(self, descriptor, created, error) -> bool:
    """No flocks on this filesystem: the exclusive create is the lock, and a lock file left by
    another run is never taken over (its run cannot be told dead from alive safely)."""
    logging.warning(
        '%s has no file locks (flock: %s): the lock is the file itself, and a lock '
        'left by a run that stopped must be deleted by hand.', os.path.dirname(self.path), error)
    if not created:
      raise self._in_use(self._holder(), ' (This filesystem has no file locks.)')
    _write_owner(descriptor, self.owner)
    return True

  def __exit__(self, *exc):
    if self._descriptor is None:
      return False
    try:
      if _same_file(self._descriptor, self.path):
        os.remove(self.path)  # while still holding the flock, so that no one takes this inode
    finally:
      os.close(self._descriptor)
      self._descriptor = None
    return False


def _write_owner(descriptor, owner: str) -> None:
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, (owner + '\n').encode('utf-8'), 0)
  os.fsync(descriptor)


def _same_file(descriptor, path) -> bool:
  """Whether descriptor is still the file at path (not removed or replaced since it was opened)."""
  try:
    here = os.stat(path)
  except FileNotFoundError:
    return False
  there = os.fstat(descriptor)
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OverflowError:
    return False
  return True
