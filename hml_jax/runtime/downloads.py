"""Files fetched once over HTTP(S), verified by SHA-256 and kept in a local cache.

The cache is $HML_JAX_CACHE, else ~/.cache/hml_jax. A download streams into a temporary file
beside its target, hashing as it goes; only a complete transfer whose digest matches is renamed to
the target name (os.replace, atomic), so a killed or failed download never leaves a file that a
later run would trust, and two processes downloading at once each write their own temporary file.

A download is bounded in size and time, so that a wrong or hostile server can neither fill the disk
nor hold a run forever: a Content-Length above the file's bound is refused before any byte is read,
and reading stops one byte past the bound; each read waits at most TIMEOUT_SECONDS, and the whole
download (connecting, headers, body) at most a deadline, $HML_JAX_DOWNLOAD_DEADLINE seconds, by
default the time the bound takes at SLOWEST_RATE_BYTES_PER_SECOND. Every failure is a
DownloadError (an errors.UserError) that starts `Could not download URL (why)` and says where to
put the file by hand.
"""
import hashlib
import http.client
import math
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence

from hml_jax.runtime import errors

CACHE_ENVIRONMENT_VARIABLE = 'HML_JAX_CACHE'
DEADLINE_ENVIRONMENT_VARIABLE = 'HML_JAX_DOWNLOAD_DEADLINE'  # seconds for a whole download
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0  # for each connect and read
# The slowest link a download waits for (0.8 Mbit/s): the default deadline is the bound's size at
# this rate (ResNet-50's 108 MiB: 19 minutes), at least MINIMUM_DEADLINE_SECONDS.
SLOWEST_RATE_BYTES_PER_SECOND = 100_000
MINIMUM_DEADLINE_SECONDS = 300.0
UNBOUNDED_DEADLINE_SECONDS = 1800.0  # the deadline of a download without a size bound


class DownloadError(errors.UserError, RuntimeError):
  """A file could not be fetched or verified; the message says where to put it by hand."""


def cache_dir() -> str:
  return os.environ.get(CACHE_ENVIRONMENT_VARIABLE) or os.path.join(os.path.expanduser('~'),
                                                                    '.cache', 'hml_jax')


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b''):
      digest.update(chunk)
  return digest.hexdigest()


class _Progress:
  """A progress bar on stderr: redrawn in place on a terminal, a line per 25% otherwise (logs,
  CI)."""

  def __init__(self, label: str, total: Optional[int], stream=None):
    self.label, self.total, self.stream = label, total, stream or sys.stderr
    self.interactive = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.next_fraction, self.last_draw, self.start = 0.25, 0.0, time.time()

  def update(self, done: int, final: bool = False):
    now = time.time()
    megabytes = f'{done / 1e6:.1f}' + (f'/{self.total / 1e6:.1f}' if self.total else '') + ' MB'
    fraction = done / self.total if self.total else None
    if self.interactive:
      if final or now - self.last_draw > 0.1:
        bar = ''
        if fraction is not None:
          filled = int(30 * fraction)
          bar = f' [{"#" * filled}{"." * (30 - filled)}] {100 * fraction:3.0f}%'
        rate = done / 1e6 / max(now - self.start, 1e-9)
        self.stream.write(f'\r{self.label}{bar} {megabytes} {rate:.1f} MB/s')
        if final:
          self.stream.write('\n')
        self.stream.flush()
        self.last_draw = now
    elif final or (fraction is not None and fraction >= self.next_fraction):
      self.stream.write(f'{self.label}: {megabytes}\n')
      self.stream.flush()
      while fraction is not None and self.next_fraction <= fraction:
        self.next_fraction += 0.25


def _by_hand(url: str, path: str, sha256: str, advice: str) -> str:
  return (f'Download {url} yourself (on any machine with internet access) and put it at {path} '
          f'(its SHA-256 must be {sha256}); nothing was written there.' +
          (f' {advice}' if advice else ''))


def default_deadline(max_bytes: Optional[int]) -> float:
  """Seconds a whole download of at most max_bytes may take: $HML_JAX_DOWNLOAD_DEADLINE, else
  max_bytes at SLOWEST_RATE_BYTES_PER_SECOND (at least MINIMUM_DEADLINE_SECONDS), else
  UNBOUNDED_DEADLINE_SECONDS without a bound."""
  value = os.environ.get(DEADLINE_ENVIRONMENT_VARIABLE, '')
  if value:
    try:
      seconds = float(value)
    except ValueError:
      seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
      raise errors.InvalidInputError(
          f'${DEADLINE_ENVIRONMENT_VARIABLE}={value!r}: expected the seconds a download may take, '
          'a number > 0 (unset it for the default).')
    return seconds
  if max_bytes is None:
    return UNBOUNDED_DEADLINE_SECONDS
  return max(MINIMUM_DEADLINE_SECONDS, max_bytes / SLOWEST_RATE_BYTES_PER_SECOND)


class _Watchdog:
  """Shuts every connection of a download down once its deadline passes, wherever the transfer is
  (connecting, reading headers or the body): a read blocked in the socket then returns at once."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.sockets: List[socket.socket] = []
    self.expired = threading.Event()
    self._lock = threading.Lock()
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True

  def __enter__(self):
    self._timer.start()
    return self

  def __exit__(self, *exc_info):
    self._timer.cancel()

  def add(self, sock: socket.socket) -> None:
    with self._lock:
      self.sockets.append(sock)
      if self.expired.is_set():
        _shut_down(sock)

  def _expire(self) -> None:
    with self._lock:
      self.expired.set()
      for sock in self.sockets:
        _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass  # already closed


def _watched(connection_class, watchdog: _Watchdog):
  """connection_class (http.client's) that hands each socket it connects to the watchdog."""

  class Watched(connection_class):

    def connect(self):
      super().connect()
      watchdog.add(self.sock)

  return Watched


class _WatchedHTTPHandler(urllib.request.HTTPHandler):

  def __init__(self, watchdog: _Watchdog):
    super().__init__()
    self.watchdog = watchdog

  def http_open(self, req):
    return self.do_open(_watched(http.client.HTTPConnection, self.watchdog), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):

  def __init__(self, watchdog: _Watchdog):
    super().__init__()
    self.watchdog = watchdog

  def https_open(self, req):
    return self.do_open(_watched(http.client.HTTPSConnection, self.watchdog),
                        req,
                        context=self._context)


class _Failed(Exception):
  """Why a transfer stopped (the text inside `Could not download URL (...)`)."""


def _megabytes(count: int) -> str:
  return f'{count / 1e6:.1f} MB'


def _transfer(url: str, output, digest, max_bytes: Optional[int], watchdog: _Watchdog,
              progress_label: Optional[str]) -> None:
  """Streams url into output and digest, within max_bytes and the watchdog's deadline, with a
  progress bar labelled progress_label (None: none); raises _Failed saying why it stopped."""
  opener = urllib.request.build_opener(_WatchedHTTPHandler(watchdog),
                                       _WatchedHTTPSHandler(watchdog))
  received, total = 0, None
  try:
    with opener.open(url, timeout=min(TIMEOUT_SECONDS, watchdog.seconds)) as response:
      length = response.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else None
      if max_bytes is not None and total is not None and total > max_bytes:
        raise _Failed(f'the server announces {total} bytes, more than the {max_bytes} this file '
                      'can have; nothing was read')
      bar = _Progress(progress_label, total) if progress_label else None
      limit = max_bytes + 1 if max_bytes is not None else math.inf  # one byte past the bound
      while received < limit:
        # read1: what has arrived (up to a chunk), so the progress and the file grow steadily.
        chunk = response.read1(int(min(CHUNK_BYTES, limit - received)))
        if not chunk or watchdog.expired.is_set():
          break
        output.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if bar:
          bar.update(received)
      if bar:
        bar.update(received, final=True)
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    if not watchdog.expired.is_set():
      if isinstance(e, urllib.error.HTTPError):
        raise _Failed(f'HTTP {e.code} {e.reason}') from e
      raise _Failed(str(getattr(e, 'reason', None) or e) or type(e).__name__) from e
  if watchdog.expired.is_set():
    raise _Failed(f'not complete after the deadline of {watchdog.seconds:g} s, with '
                  f'{_megabytes(received)}' + (f' of {_megabytes(total)}' if total else '') +
                  f' received; a slow link may take longer with ${DEADLINE_ENVIRONMENT_VARIABLE}'
                  '=SECONDS')
  if max_bytes is not None and received > max_bytes:
    raise _Failed(f'the server sent more than the {max_bytes} bytes this file can have; stopped '
                  'there')
  if total is not None and received != total:
    raise _Failed(f'the transfer stopped after {received} of {total} bytes')


def download(url: str,
             path: str,
             sha256: str,
             progress: bool = True,
             max_bytes: Optional[int] = None,
             deadline_seconds: Optional[float] = None,
             advice: str = '') -> str:
  """Fetches url to path, verified against the hex SHA-256 digest; returns path.

  At most max_bytes are accepted (None: no bound) within deadline_seconds for the whole download
  (None: default_deadline(max_bytes)). On any failure (no network, an HTTP error, a transfer that
  is truncated, too large or too slow, a wrong digest) raises DownloadError, `Could not download
  URL (why)`, naming the path to put the file at by hand and its digest, then advice (what else
  the caller's user may do); nothing is left at path or beside it.
  """
  by_hand = _by_hand(url, path, sha256, advice)
  if deadline_seconds is None:
    deadline_seconds = default_deadline(max_bytes)
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.',
                                             suffix='.part',
                                             dir=directory)
  except OSError as e:
    raise DownloadError(f'Could not download {url} (cannot write into {directory}: {e}; set '
                        f'${CACHE_ENVIRONMENT_VARIABLE} to a writable folder). {by_hand}') from e
  try:
    digest = hashlib.sha256()
    with os.fdopen(descriptor, 'wb') as output:
      try:
        with _Watchdog(deadline_seconds) as watchdog:
          _transfer(url, output, digest, max_bytes, watchdog,
                    f'Downloading {url} to {path}' if progress else None)
      except _Failed as e:
        raise DownloadError(f'Could not download {url} ({e}). {by_hand}') from e.__cause__
      output.flush()
      os.fsync(output.fileno())
    if digest.hexdigest() != sha256:
      raise DownloadError(f'Could not download {url} (it gave a file with SHA-256 '
                          f'{digest.hexdigest()}, not the expected {sha256}; discarded). {by_hand}')
    # mkstemp makes the file readable by its owner only; a shared cache needs the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    try:
      os.chmod(temporary, 0o644 & ~umask)
      os.replace(temporary, path)
    except OSError as e:
      raise DownloadError(f'Could not download {url} (the verified file could not be moved to '
                          f'{path}: {e}). {by_hand}') from e
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path


def cached_or_download(url: str,
                       sha256: str,
                       filename: Optional[str] = None,
                       other_places: Sequence[str] = (),
                       progress: bool = True,
                       max_bytes: Optional[int] = None,
                       deadline_seconds: Optional[float] = None,
                       advice: str = '') -> str:
  """The path of a verified copy of url: cache_dir()/filename if it is there (or in one of
  other_places, folders another tool caches it in), else downloaded to cache_dir()/filename
  (download: at most max_bytes within deadline_seconds; advice ends its error messages).

  A cached file whose digest is not sha256 is an error (it is never overwritten or deleted: it
  may be a user's); one in other_places is skipped with a warning.
  """
  filename = filename or os.path.basename(url)
  path = os.path.join(cache_dir(), filename)
  if os.path.isfile(path):
    actual = sha256_of(path)
    if actual != sha256:
      raise DownloadError(f'{path} has SHA-256 {actual}, not the expected {sha256} of {url}: '
                          'it is damaged or another file. Move it away (a run then downloads the '
                          'file again) or replace it with the right one.')
    return path
  for place in other_places:
    candidate = os.path.join(place, filename)
    if os.path.isfile(candidate):
      if sha256_of(candidate) == sha256:
        return candidate
      sys.stderr.write(f'Warning: {candidate} does not have the SHA-256 {sha256} of {url}; not '
                       'used.\n')
  _remove_stale_parts(path)
  return download(url,
                  path,
                  sha256,
                  progress=progress,
                  max_bytes=max_bytes,
                  deadline_seconds=deadline_seconds,
                  advice=advice)


STALE_PART_SECONDS = 600


def _remove_stale_parts(path: str) -> None:
  """Deletes the temporary files of downloads of path that were killed: those not written to for
  STALE_PART_SECONDS (a live download writes to its own continuously)."""
  directory, name = os.path.split(path)
  if not os.path.isdir(directory):
    return
  for entry in os.listdir(directory):
    candidate = os.path.join(directory, entry)
    if entry.startswith(f'.{name}.') and entry.endswith('.part'):
      try:
        if time.time() - os.path.getmtime(candidate) > STALE_PART_SECONDS:
          os.remove(candidate)
      except OSError:
        pass  # another process removed or renamed it
