"""The zip archive of a torch.save file, read within bounds (hml_jax/init_from/pth_files.py, "the
zip directory"): one entry per name, unencrypted, stored or deflated, sizes that fit in the file
and a bounded total expansion; each entry read as exactly the size its directory gives."""
import copy
import zipfile
import zlib
from typing import Dict

from hml_jax.init_from.pth_pickle import damaged, PthFileError

_ENCRYPTED = 0x1 | 0x40 | 0x2000  # zip flags: encrypted, strong encryption, masked header
_EXPANSION_SLACK = 2**20  # bytes of expansion every archive may have, however small
_CHUNK = 2**20  # the bytes of one read


def checked_directory(archive: zipfile.ZipFile, file_size: int, path: str, max_expansion: int,
                      max_bytes: int) -> Dict[str, zipfile.ZipInfo]:
  """{name: ZipInfo} of an archive whose entries can all be read within the bounds: their
  uncompressed sizes total at most max_expansion times the file (plus 1 MiB) and max_bytes
  (pth_files.MAX_EXPANSION, MAX_BYTES)."""
  infos: Dict[str, zipfile.ZipInfo] = {}
  compressed = uncompressed = 0
  for info in archive.infolist():
    name = info.filename
    if name in infos:
      raise damaged(path, f'two entries are named {name!r}')
    if info.flag_bits & _ENCRYPTED:
      raise PthFileError(f'{path}: entry {name!r} is encrypted; torch.save never encrypts, and '
                         'an encrypted weights file is not read. Decrypt it first.')
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise PthFileError(
          f'{path}: entry {name!r} is compressed with zip method {info.compress_type}; only '
          'stored entries (what torch.save writes) and deflated ones are read. Save the state '
          'dict again with torch.save.')
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
      raise damaged(
          path, f'stored entry {name!r} has {info.compress_size} bytes in the file '
          f'but {info.file_size} uncompressed')
    if info.header_offset + info.compress_size > file_size:
      raise damaged(path, f'entry {name!r} reaches past the end of the file')
    compressed += info.compress_size
    uncompressed += info.file_size
    infos[name] = info
  if compressed > file_size:
    raise damaged(
        path, f'its entries hold {compressed} compressed bytes in a file of '
        f'{file_size} (entries that overlap)')
  limit = min(max_expansion * file_size + _EXPANSION_SLACK, max_bytes)
  if uncompressed > limit:
    raise PthFileError(
        f'{path}: its entries would take {uncompressed} bytes uncompressed, more than {limit} '
        f'({max_expansion}x the file, plus 1 MiB, at most MAX_BYTES={max_bytes}; '
        'hml_jax.init_from.pth_files): a deflate bomb, or a file compressed far beyond what weights '
        'allow. torch.save writes entries uncompressed; save the state dict again with it.')
  return infos


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytearray:
  """The entry's bytes: exactly info.file_size (which the caller has bounded), read in chunks,
  so that no entry, whatever its compressed bytes hold, makes more than that in memory."""
  size = info.file_size
  buffer = bytearray(size)
  view = memoryview(buffer)
  done = 0
  # zipfile stops at file_size: one byte more, so that a deflate stream longer than its entry
  # gives that byte (and the end of a stream of the right length is reached, its CRC checked).
  beyond = copy.copy(info)
  beyond.file_size = size + 1
  try:
    with archive.open(beyond) as entry:
      while done < size:
        chunk = entry.read(min(_CHUNK, size - done))
        if not chunk:
          break
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
      longer = done == size and entry.read(1)
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
          NotImplementedError) as e:
    raise damaged(
        path, f'entry {info.filename!r} cannot be read ({type(e).__name__}: '
        f'{str(e)[:200]})') from e
  if done != size or longer:
    raise damaged(
        path, f'entry {info.filename!r} holds {"more" if longer else done} bytes, not '
        f'the {size} of the zip directory')
  return buffer


def archive_prefix(infos: Dict[str, zipfile.ZipInfo], path: str) -> str:
  pickles = [name for name in infos if name.endswith('/data.pkl') and name.count('/') == 1]
  if len(pickles) != 1:
    raise PthFileError(f'{path}: not a torch.save archive (expected one <archive>/data.pkl, '
                       f'found {pickles[:5]}).')
  return pickles[0][:-len('/data.pkl')]


def byteorder(archive: zipfile.ZipFile, infos: Dict[str, zipfile.ZipInfo], prefix: str,
              path: str) -> str:
  info = infos.get(f'{prefix}/byteorder')
  if info is None:
    return 'little'
  if info.file_size > 16:
    raise damaged(path, f'its byteorder entry has {info.file_size} bytes')
  value = bytes(read_entry(archive, info, path)).decode('ascii', errors='replace').strip()
  if value not in ('little', 'big'):
    raise damaged(path, f'unknown byte order {value!r}')
  return value
