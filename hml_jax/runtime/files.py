"""Workdir files on a local disk or a bucket (gs://...), through etils.epath.

Training on a TPU pod writes to a bucket every worker shares; orbax and clu already accept such
paths, and this module lets the rest of hml_jax (config.json, dataset.json, results.json, tables,
figures) do the same. Local files are replaced atomically and durably (written aside under a
name of their own, flushed to disk, renamed, and the rename flushed too), so neither a crash nor
a power loss leaves half a file or an empty one; a bucket replaces whole objects by itself.
"""
import errno
import hashlib
import json
import os
import secrets
from typing import Any, Dict, Tuple

from etils import epath

from hml_jax.runtime import errors

# Filesystems that cannot flush a directory (some network and FUSE ones) say so with these; the
# rename is then as durable as that filesystem makes it.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def is_local(path) -> bool:
  return '://' not in str(path)


def absolute(path) -> str:
  """An absolute local path, or the bucket URL unchanged."""
  return os.path.abspath(path) if is_local(path) else str(path)


def join(path, *parts) -> str:
  return str(epath.Path(path).joinpath(*parts))


def exists(path) -> bool:
  return epath.Path(path).exists()


def is_dir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path):
  return [p.name for p in epath.Path(path).iterdir()]


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def fsync_directory(directory) -> None:
  """Flushes a directory's entries (a rename or a new file in it) to disk."""
  descriptor = os.open(directory or '.', os.O_RDONLY)
  try:
    os.fsync(descriptor)
  except OSError as error:
    if error.errno not in _NO_DIRECTORY_FSYNC:
      raise
  finally:
    os.close(descriptor)


def temporary_name(path) -> str:
  """A name beside path that no other writer uses (process id and a random part), so that two
  processes or threads writing the same file never share a half-written temporary file."""
  return f'{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp'


def write_bytes(path, data: bytes) -> None:
  """Replaces path by data, atomically and durably on a local disk: readers and a crash or a
  power loss at any moment see the old file or the new one, never a part of it."""
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  path = os.fspath(path)
  temporary = temporary_name(path)
  try:
    with open(temporary, 'xb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the data on disk before the name points at it
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  fsync_directory(os.path.dirname(path))  # the new name on disk too


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path, value: Any, **options) -> None:
  write_text(path, json.dumps(value, indent=2, **options))


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path) -> str:
  return epath.Path(path).read_text()


def read_json(path, what_to_do: str = '') -> Any:
  """The JSON value in path. A file that does not parse (cut short by a crash or a full disk,
  edited by hand) is an errors.InvalidInputError naming it; what_to_do ends the message (the
  caller knows what the file is for), by default: restore it or write it anew."""
  try:
    return json.loads(read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise errors.InvalidInputError(f'{path} is not valid JSON (truncated?): {error}. ' + (
        what_to_do or 'Restore it from a copy, or remove it and run the command that wrote '
        'it again.')) from None


def rename(source, target) -> None:
  epath.Path(source).rename(target)


def sha256_and_size(path, chunk_bytes: int = 1 << 22) -> Tuple[str, int]:
  """(hex SHA-256, size in bytes) of a file, read in chunks (local or through a bucket)."""
  digest = hashlib.sha256()
  size = 0
  with epath.Path(path).open('rb') as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
      size += len(chunk)
  return digest.hexdigest(), size


def size(path) -> int:
  """A file's size in bytes (local or in a bucket), without reading it."""
  if is_local(path):
    return os.path.getsize(path)
  return epath.Path(path).stat().length


def tree_files(directory) -> Dict[str, str]:
  """Every file under directory: relative path (with '/') -> full path, sorted."""
  root = epath.Path(directory)
  if is_local(directory):
    found = {}
    for parent, _, names in os.walk(directory):
      for name in names:
        full = os.path.join(parent, name)
        found[os.path.relpath(full, directory).replace(os.sep, '/')] = full
  else:
    found = {str(p.relative_to(root)): str(p) for p in root.rglob('*') if p.is_file()}
  return dict(sorted(found.items()))
