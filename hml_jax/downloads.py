"""Files fetched once over HTTP(S), verified by SHA-256 and kept in a local cache.

The cache is $HML_JAX_CACHE, else ~/.cache/hml_jax. A download streams into a temporary file
beside its target, hashing as it goes; only a complete transfer whose digest matches is renamed to
the target name (os.replace, atomic), so a killed or failed download never leaves a file that a
later run would trust, and two processes downloading at once each write their own temporary file.
"""
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

CACHE_ENVIRONMENT_VARIABLE = 'HML_JAX_CACHE'
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0


class DownloadError(RuntimeError):
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


def _by_hand(url: str, path: str, sha256: str) -> str:
  return (f'Download {url} yourself (on any machine with internet access) and put it at {path} '
          f'(its SHA-256 must be {sha256}); nothing was written there.')


def download(url: str, path: str, sha256: str, progress: bool = True) -> str:
  """Fetches url to path, verified against the hex SHA-256 digest; returns path. On any failure
  (no network, HTTP error, a truncated transfer, a wrong digest) raises DownloadError naming the
  URL, the path and the expected digest, and leaves nothing at path or beside it."""
  directory = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.',
                                             suffix='.part',
                                             dir=directory)
  except OSError as e:
    raise DownloadError(f'Cannot write into {directory} ({e}); set ${CACHE_ENVIRONMENT_VARIABLE} '
                        'to a writable folder. ' + _by_hand(url, path, sha256)) from e
  try:
    digest, received = hashlib.sha256(), 0
    with os.fdopen(descriptor, 'wb') as output:
      try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
          length = response.headers.get('Content-Length')
          total = int(length) if length and length.isdigit() else None
          bar = _Progress(f'Downloading {url} to {path}', total) if progress else None
          # read1: what has arrived (up to a chunk), so the progress and the file grow steadily.
          for chunk in iter(lambda: response.read1(CHUNK_BYTES), b''):
            output.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            if bar:
              bar.update(received)
          if bar:
            bar.update(received, final=True)
      except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, 'reason', None) or e
        raise DownloadError(f'Could not download {url} ({reason}). ' +
                            _by_hand(url, path, sha256)) from e
      if total is not None and received != total:
        raise DownloadError(f'The download of {url} stopped after {received} of {total} bytes. ' +
                            _by_hand(url, path, sha256))
      output.flush()
      os.fsync(output.fileno())
    if digest.hexdigest() != sha256:
      raise DownloadError(f'{url} gave a file with SHA-256 {digest.hexdigest()}, not the expected '
                          f'{sha256}: it was discarded. ' + _by_hand(url, path, sha256))
    # mkstemp makes the file readable by its owner only; a shared cache needs the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    try:
      os.chmod(temporary, 0o644 & ~umask)
      os.replace(temporary, path)
    except OSError as e:
      raise DownloadError(f'Could not move the verified download to {path} ({e}). ' +
                          _by_hand(url, path, sha256)) from e
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path


def cached_or_download(url: str,
                       sha256: str,
                       filename: Optional[str] = None,
                       other_places: Sequence[str] = (),
                       progress: bool = True) -> str:
  """The path of a verified copy of url: cache_dir()/filename if it is there (or in one of
  other_places, folders another tool caches it in), else downloaded to cache_dir()/filename.

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
  return download(url, path, sha256, progress=progress)


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
