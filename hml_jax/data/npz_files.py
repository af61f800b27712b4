"""The arrays of a user's .npz file (features, weights), read without pickles in bounded memory.

np.load(allow_pickle=False) refuses pickles, but it bounds nothing: a member's .npy header may
declare any shape (numpy allocates it before reading the data), and a deflated member may expand
a thousandfold. read_arrays checks what the file declares before reading any array:

  the zip directory  members NAME.npy, each listed once, unencrypted, stored or deflated; their
                     uncompressed sizes total at most MAX_EXPANSION times the file plus
                     EXPANSION_ALLOWANCE (a savez file is the size of its arrays; savez_compressed
                     shrinks float features about 1.1x and 0/1 labels up to some 50x, which the
                     allowance covers for any label matrix up to a GiB)
  each header        read by numpy's own parser from the member's first bytes: a plain dtype (no
                     object fields, which only a pickle could fill), and its shape times the item
                     size plus the header is exactly the member's uncompressed size in the
                     directory, so numpy allocates what the file holds and no more

Every failure is an errors.InvalidInputError naming the file (and the key) and what to do.
"""
import os
import zipfile
import zlib
from typing import Dict

import numpy as np

from hml_jax.runtime import errors

MAX_EXPANSION = 32
EXPANSION_ALLOWANCE = 2**30
_ENCRYPTED = 0x1 | 0x40 | 0x2000  # zip flags: encrypted, strong encryption, masked header
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _header(member) -> tuple:
  """(shape, fortran_order, dtype, header bytes) of the .npy stream member (numpy's parser)."""
  version = np.lib.format.read_magic(member)
  if version == (1, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
  elif version in ((2, 0), (3, 0)):
    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
  else:
    raise ValueError(f'.npy format version {version} is not supported')
  return shape, fortran_order, dtype, member.tell()


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, where: str,
                  remedy: str) -> None:
  with archive.open(info) as member:
    try:
      shape, _, dtype, header_bytes = _header(member)
    except ValueError as error:
      raise errors.InvalidInputError(f'{where}: key {key!r} is not an .npy array ({error}); '
                                     f'{remedy}.') from None
  if dtype.hasobject:
    raise errors.InvalidInputError(
        f'{where}: key {key!r} cannot be read: it is an object array, which only unpickling '
        'could read (a pickle can run any code, so hml_jax never unpickles a data file); store '
        'it as a numeric array, or names as strings (dtype str).')
  declared = int(np.prod(shape, dtype=object)) * dtype.itemsize + header_bytes
  if declared != info.file_size:
    raise errors.InvalidInputError(
        f'{where}: key {key!r} declares a {"x".join(map(str, shape)) or "scalar"} {dtype} array '
        f'({declared - header_bytes} bytes), but its member holds {info.file_size - header_bytes}: '
        f'the file is damaged or was not written by numpy; {remedy}.')


def read_arrays(path: str,
                what: str = '',
                remedy: str = 'write it again with numpy.savez') -> Dict[str, np.ndarray]:
  """Every array of the .npz at path, name -> array, in the order stored.

  what: how the message names the file's role, e.g. ' (config.dataset.path)'.
  remedy: what the user should do about a damaged file, ending each message.
  """
  where = f'{path}{what}'
  if not zipfile.is_zipfile(path):
    if os.path.isfile(path) and open(path, 'rb').read(6) == b'\x93NUMPY':
      raise errors.InvalidInputError(
          f'{where} is a single .npy array, not an .npz of named arrays; write it with '
          'numpy.savez(path, name=array, ...).')
    raise errors.InvalidInputError(f'{where} is truncated or not an .npz file (a zip archive); '
                                   f'{remedy}, or copy it again if it was cut short.')
  try:
    with zipfile.ZipFile(path) as archive:
      infos = archive.infolist()
      names = [info.filename for info in infos]
      if len(set(names)) != len(names):
        raise errors.InvalidInputError(f'{where} lists a member twice; {remedy}.')
      for info in infos:
        if not info.filename.endswith('.npy'):
          raise errors.InvalidInputError(f'{where}: member {info.filename!r} is not an .npy '
                                         f'array; {remedy}.')
        if info.flag_bits & _ENCRYPTED or info.compress_type not in _COMPRESSIONS:
          raise errors.InvalidInputError(
              f'{where}: member {info.filename!r} is encrypted or compressed otherwise than '
              f'numpy does (method {info.compress_type}); {remedy}.')
      total = sum(info.file_size for info in infos)
      bound = MAX_EXPANSION * os.path.getsize(path) + EXPANSION_ALLOWANCE
      if total > bound:
        raise errors.InvalidInputError(
            f'{where} declares {total:,} bytes of arrays in a file of '
            f'{os.path.getsize(path):,}: more than {MAX_EXPANSION}x its size plus '
            f'{EXPANSION_ALLOWANCE:,} bytes, which only a decompression bomb needs. If it is '
            'genuine, write it with numpy.savez (uncompressed), or raise '
            'hml_jax.data.npz_files.MAX_EXPANSION.')
      arrays = {}
      for info in infos:
        key = info.filename[:-len('.npy')]
        _check_member(archive, info, key, where, remedy)
        try:
          with archive.open(info) as member:
            arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as error:
          raise errors.InvalidInputError(
              f'{where}: key {key!r} cannot be read ({type(error).__name__}: {error}): the file '
              f'is damaged or truncated; {remedy}.') from None
      return arrays
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error,
          NotImplementedError) as error:
    raise errors.InvalidInputError(
        f'{where} is truncated or not an .npz file ({type(error).__name__}: {error}); '
        f'{remedy}, or copy it again if it was cut short.') from None
