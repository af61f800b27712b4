"""PyTorch .pth state dicts read without torch and without running pickled code.

torch.save writes a zip archive (the format of every torchvision weights file since PyTorch 1.6):

  <archive>/data.pkl     a pickle of the state dict, in which every tensor is the call
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                         and every storage a persistent id ('storage', torch.FloatStorage,
                         key, location, numel)
  <archive>/data/<key>   each storage's raw bytes
  <archive>/byteorder    'little' or 'big' (absent in older files: little)

A weights file may come from anywhere, so every step is bounded by what the file declares and
checked before it is done:

  the zip directory  one entry per name, unencrypted, stored or deflated; the compressed sizes fit
                     in the file, the uncompressed ones total at most MAX_EXPANSION times the file
                     (and MAX_BYTES); every entry is read with a bounded read of exactly the size
                     the directory gives (a longer or shorter entry, or a bad CRC, is an error).
  the pickle         at most MAX_PICKLE_BYTES, scanned opcode by opcode before it is unpickled
                     (pickletools.genops parses without executing): only the opcodes a state dict
                     needs, only the names below, nesting at most MAX_NESTING deep, at most
                     MAX_OBJECTS containers and MAX_STACK stack items, memo indices in order, and
                     no object changed after it was put into another (so the depths are exact).
  the names          find_class answers only collections.OrderedDict, torch._utils'
                     _rebuild_tensor_v2 and _rebuild_parameter, and torch.<Type>Storage, each
                     with an immutable stand-in defined here (torch is never imported); any other
                     name is UnsafePickleError and nothing runs.
  the storages       a storage is only a _Storage that persistent_load made for an entry of this
                     archive: 1-D, of the declared type and element count, which must equal the
                     entry's size in the directory before it is read.
  the tensors        a tensor is only rebuilt from such a storage (never from an array or another
                     tensor), by indexing its 1-D elements (slicing, or np.take with indices that
                     are checked to lie in the storage); the arrays of one file total at most
                     MAX_VIEW_FACTOR times its storages' bytes, and MAX_BYTES.

Every failure, of whatever kind, is a PthFileError naming the file and the reason (a
UserError: the command line prints it as one line).
"""
import collections
import io
import math
import os
import pickle
import re
import reprlib
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

from hml_jax.init_from import pth_archive
from hml_jax.init_from import pth_pickle
# The reader's errors (pth_files.PthFileError, UnsafePickleError) and their messages.
from hml_jax.init_from.pth_pickle import damaged, refused_name, unsafe
from hml_jax.init_from.pth_pickle import ORDERED_DICT, REBUILD_PARAMETER, REBUILD_TENSOR
from hml_jax.init_from.pth_pickle import PthFileError, UnsafePickleError  # noqa: F401

# Bounds on what one file may make this process do. Module constants, so a user with a genuine
# file beyond them can raise them (hml_jax.init_from.pth_files.MAX_BYTES = ...).
#
# The arrays a file gives, in total, and its archive's uncompressed entries, in total.
MAX_BYTES = 2**34
# The arrays' bytes over the storages' bytes. torch.save writes each storage once, and a state
# dict's tensors cover their storages at most once, except for names that share a tensor (tied
# weights: 2x for an embedding shared with the output layer). 4 leaves room for that twice over;
# anything beyond is views that repeat elements (zero strides, overlapping views), which only a
# hostile file has, and which would otherwise turn a few bytes of file into any amount of memory.
MAX_VIEW_FACTOR = 4
# The archive's uncompressed bytes over its file size (plus 1 MiB). torch.save stores entries
# uncompressed (ratio 1); a file repacked with deflate compresses weights about 1.1x. Deflate
# itself reaches 1000x, so this is what bounds a deflate bomb's memory by the file's size.
MAX_EXPANSION = 32
# data.pkl: torch writes about 100 bytes per tensor (10 KB for a ResNet-18).
MAX_PICKLE_BYTES = 2**24
# A state dict is 4 deep (OrderedDict -> _metadata -> module -> version).
MAX_NESTING = 100
# Containers and results the pickle makes (about 10 per tensor) and items on its stack at once
# (Python's pickler batches dict items by 1000).
MAX_OBJECTS = 2**21
MAX_STACK = 2**16
MAX_DIMS = 32
# Bytes per read of an entry, and elements per step of a strided copy.
_CHUNK = 2**20

# torch.<Name>Storage -> the element type of its bytes.
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}

_NAMES = frozenset(pth_pickle.CALLABLES + tuple(('torch', name) for name in _STORAGE_DTYPES))

# A storage key (torch writes '0', '1', ...): one entry name under data/, never a path.
_KEY = re.compile(r'[0-9A-Za-z_]{1,64}')


def _repr(value) -> str:
  return reprlib.repr(value)


def _is_count(value) -> bool:
  """A non-negative Python int of a plausible size (bools are not counts)."""
  return type(value) is int and 0 <= value <= 2**62  # pylint: disable=unidiomatic-typecheck


# The pickle, scanned before it is unpickled.

# The stand-ins that the pickle's names are answered with.


class _Frozen:
  """No attribute of a stand-in can be set, by a pickle's BUILD or otherwise."""
  __slots__ = ()

  def __setattr__(self, key, value):
    raise UnsafePickleError(f'a pickle tried to set {key!r} of {type(self).__name__}')

  def _set(self, **values):
    for key, value in values.items():
      object.__setattr__(self, key, value)


class _StorageType(_Frozen):
  """Stand-in for a torch.<Name>Storage class: only its element type is used."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self._set(name=name, dtype=np.dtype(_STORAGE_DTYPES[name]))

  def __setattr__(self, key, value):
    raise UnsafePickleError(f'a pickle tried to set {key!r} of torch.{self.name}')


class _Storage(_Frozen):
  """A storage of one archive: a read-only 1-D array of its declared type and element count."""
  __slots__ = ('entry', 'type_name', 'numel', 'array', 'owner')

  def __init__(self, entry: str, type_name: str, array: np.ndarray, owner: object):
    self._set(entry=entry, type_name=type_name, numel=array.size, array=array, owner=owner)


class _Tensor(_Frozen):
  """A rebuilt tensor (its own array); unwrapped only when the whole pickle is read."""
  __slots__ = ('array',)

  def __init__(self, array: np.ndarray):
    self._set(array=array)


class _Callable(_Frozen):
  """Stand-in for one of the callables a pickle may name."""
  __slots__ = ('name', 'function')

  def __init__(self, name: str, function):
    self._set(name=name, function=function)

  def __call__(self, *args):
    return self.function(*args)


def _storage_array(data: bytearray, type_name: str, byteorder: str) -> np.ndarray:
  """The elements of a storage's bytes: read as unsigned integers in the file's byte order and
  viewed as the element type (so every type, bfloat16 included, swaps alike); bools as 0/1."""
  dtype = np.dtype(_STORAGE_DTYPES[type_name])
  order = '<' if byteorder == 'little' else '>'
  words = np.frombuffer(data, np.dtype(f'{order}u{dtype.itemsize}'))
  words = words.astype(f'=u{dtype.itemsize}', copy=False)
  array = (words != 0) if dtype == np.bool_ else words.view(dtype)
  array.flags.writeable = False
  return array


def _is_contiguous(size: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _strided_copy(flat: np.ndarray, offset: int, size: Tuple[int, ...],
                  stride: Tuple[int, ...]) -> np.ndarray:
  """torch's strided view of a 1-D storage, as a new array: element (i0, i1, ...) is
  flat[offset + i0 * stride0 + i1 * stride1 + ...]. The caller has checked that the largest such
  index is within flat; np.take checks each index again (mode='raise')."""
  numel = math.prod(size)
  if _is_contiguous(size, stride):
    part = flat[offset:offset + numel]
    if part.size != numel:
      raise AssertionError('a contiguous tensor past its storage')  # excluded by the caller
    return part.reshape(size).copy()
  out = np.empty(numel, flat.dtype)
  for start in range(0, numel, _CHUNK):
    positions = np.arange(start, min(start + _CHUNK, numel), dtype=np.int64)
    index = np.full(positions.shape, offset, np.int64)
    for n, s in zip(reversed(size), reversed(stride)):
      index += (positions % n) * s
      positions //= n
    out[start:start + index.size] = np.take(flat, index, mode='raise')
  return out.reshape(size)


class _Loader:
  """The storages and tensors of one archive, with the bytes they take."""

  def __init__(self, archive: zipfile.ZipFile, infos: Dict[str, zipfile.ZipInfo], prefix: str,
               byteorder: str, path: str):
    self.archive, self.infos, self.prefix = archive, infos, prefix
    self.byteorder, self.path = byteorder, path
    self.storages: Dict[str, _Storage] = {}
    self.storage_bytes = self.tensor_bytes = 0
    self.owner = object()  # marks this archive's storages

  def names(self) -> Dict[Tuple[str, str], Any]:
    """The names a state dict's pickle may hold, answered by stand-ins made for this load."""
    return {
        ORDERED_DICT: _Callable('OrderedDict', self.ordered_dict),
        REBUILD_TENSOR: _Callable('_rebuild_tensor_v2', self.rebuild_tensor),
        REBUILD_PARAMETER: _Callable('_rebuild_parameter', self.rebuild_parameter),
        **{
            ('torch', name): _StorageType(name) for name in _STORAGE_DTYPES
        },
    }

  def ordered_dict(self, *args):
    if args:
      raise unsafe(self.path, f'its pickle calls OrderedDict with {len(args)} arguments')
    return collections.OrderedDict()

  def storage(self, persistent_id) -> _Storage:
    """The storage of a persistent id ('storage', torch.<Type>Storage, key, location, numel),
    read from the archive the first time (after its size is checked against the directory)."""
    if (type(persistent_id) is not tuple or len(persistent_id) != 5 or  # pylint: disable=unidiomatic-typecheck
        type(persistent_id[0]) is not str or persistent_id[0] != 'storage'
        or not isinstance(persistent_id[1], _StorageType) or type(persistent_id[2]) is not str
        or not _KEY.fullmatch(persistent_id[2]) or type(persistent_id[3]) is not str
        or not _is_count(persistent_id[4])):
      raise unsafe(self.path, f'its pickle has an unexpected persistent id {_repr(persistent_id)}')
    _, storage_type, key, _, numel = persistent_id
    entry = f'{self.prefix}/data/{key}'
    storage = self.storages.get(entry)
    if storage is not None:
      if (storage.type_name, storage.numel) != (storage_type.name, numel):
        raise damaged(
            self.path, f'storage {entry!r} is declared as {storage.numel} elements of '
            f'{storage.type_name} and as {numel} of {storage_type.name}')
      return storage
    info = self.infos.get(entry)
    if info is None:
      raise damaged(self.path, f'no storage {entry!r} in the archive')
    nbytes = numel * storage_type.dtype.itemsize
    if info.file_size != nbytes:
      raise damaged(
          self.path, f'storage {entry!r} holds {info.file_size} bytes, not {numel} elements '
          f'of {storage_type.name} ({nbytes} bytes)')
    array = _storage_array(pth_archive.read_entry(self.archive, info, self.path), storage_type.name,
                           self.byteorder)
    self.storage_bytes += nbytes
    storage = _Storage(entry, storage_type.name, array, self.owner)
    self.storages[entry] = storage
    return storage

  def rebuild_tensor(self, *args) -> _Tensor:
    """Stand-in for torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
    requires_grad, backward_hooks[, metadata]): the strided view of a storage, copied."""
    if not 4 <= len(args) <= 7:
      raise unsafe(self.path, f'its pickle calls _rebuild_tensor_v2 with {len(args)} arguments')
    storage, offset, size, stride = args[:4]  # a state dict's tensors need nothing else
    if not isinstance(storage, _Storage) or storage.owner is not self.owner:
      raise unsafe(
          self.path, f'its pickle rebuilds a tensor from a {type(storage).__name__}, '
          'not from a storage of the archive')
    shape_ok = (
        type(size) is tuple and type(stride) is tuple and  # pylint: disable=unidiomatic-typecheck
        len(size) == len(stride) <= MAX_DIMS and all(map(_is_count, size + stride)))
    if not shape_ok or not _is_count(offset):
      raise damaged(
          self.path, f'a tensor of size {_repr(size)} and stride {_repr(stride)} at offset '
          f'{_repr(offset)} (expected tuples of at most {MAX_DIMS} non-negative ints)')
    where = (f'a tensor of size {size}, stride {stride} at offset {offset} into storage '
             f'{storage.entry!r} of {storage.numel} elements')
    numel = math.prod(size)
    itemsize = storage.array.itemsize
    if math.prod(max(n, 1) for n in size) * itemsize > MAX_BYTES:
      raise damaged(self.path, f'{where}: more than MAX_BYTES={MAX_BYTES} bytes')
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (numel and last >= storage.numel) or offset > storage.numel:
      raise damaged(self.path, f'{where} reaches element {last} of a storage of {storage.numel}')
    self.tensor_bytes += numel * itemsize
    bound = min(MAX_VIEW_FACTOR * self.storage_bytes, MAX_BYTES)
    if self.tensor_bytes > bound:
      raise PthFileError(
          f'{self.path}: its tensors would take {self.tensor_bytes} bytes (with {where}), more '
          f'than {MAX_VIEW_FACTOR}x the {self.storage_bytes} bytes of the storages they view '
          f'(hml_jax.init_from.pth_files.MAX_VIEW_FACTOR, and MAX_BYTES={MAX_BYTES}): a state dict '
          "repeats its storages' elements only where names share weights; a file made to take "
          'memory does. If the file is genuine, raise MAX_VIEW_FACTOR.')
    if not numel:
      return _Tensor(np.zeros(size, storage.array.dtype))
    return _Tensor(_strided_copy(storage.array, offset, size, stride))

  def rebuild_parameter(self, *args) -> _Tensor:
    """Stand-in for torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)."""
    if not 1 <= len(args) <= 3 or not isinstance(args[0], _Tensor):
      raise unsafe(self.path, 'its pickle calls _rebuild_parameter with other than a tensor')
    return args[0]


class _StateDictUnpickler(pickle.Unpickler):
  """Admits only the stand-ins' names; reads each storage from the archive when referenced."""

  def __init__(self, file, loader: _Loader):
    super().__init__(file)
    self.loader = loader
    self.allowed = loader.names()

  def find_class(self, module, name):
    if (module, name) in self.allowed:
      return self.allowed[(module, name)]
    raise refused_name(self.loader.path, module, name)

  def persistent_load(self, pid):
    return self.loader.storage(pid)


def _state_dict(loaded, path: str) -> Dict[str, np.ndarray]:
  if not isinstance(loaded, dict):
    what = 'tensor' if isinstance(loaded, _Tensor) else type(loaded).__name__
    raise PthFileError(f'{path} holds a {what}, not a state dict.')
  not_names = [name for name in loaded if not isinstance(name, str)]
  if not_names:
    raise PthFileError(f'{path} is not a state dict: its keys {_repr(not_names)} are not names.')
  not_tensors = sorted(name for name, value in loaded.items() if not isinstance(value, _Tensor))
  if not_tensors:
    raise PthFileError(f'{path} is not a flat state dict (name -> tensor): entries '
                       f'{not_tensors[:10]} are not tensors (a training checkpoint? save its '
                       "model's state_dict() instead).")
  return {name: value.array for name, value in loaded.items()}


def _read(path: str) -> Dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise PthFileError(f'{path}: no such file.')
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as file:
      if file.read(4) == b'PK\x03\x04':  # a zip's first entry, but no end of its directory
        raise damaged(path, 'its zip archive is cut short or damaged (no end of directory)')
    raise PthFileError(
        f'{path}: not a zip archive. PyTorch writes .pth files as zip archives since 1.6; an '
        'older file (or one made with _use_new_zipfile_serialization=False) is read only by '
        'torch: convert it once where torch is installed (hml_jax/init_from/torchvision.py says how).'
    )
  with open(path, 'rb') as file, zipfile.ZipFile(file) as archive:
    infos = pth_archive.checked_directory(archive,
                                          os.fstat(file.fileno()).st_size, path, MAX_EXPANSION,
                                          MAX_BYTES)
    prefix = pth_archive.archive_prefix(infos, path)
    byteorder = pth_archive.byteorder(archive, infos, prefix, path)
    info = infos[f'{prefix}/data.pkl']
    if info.file_size > MAX_PICKLE_BYTES:
      raise PthFileError(f'{path}: its pickle has {info.file_size} bytes, more than '
                         f'MAX_PICKLE_BYTES={MAX_PICKLE_BYTES} (hml_jax.init_from.pth_files).')
    pickled = bytes(pth_archive.read_entry(archive, info, path))
    pth_pickle.check_pickle(pickled, path, pth_pickle.Bounds(MAX_NESTING, MAX_OBJECTS, MAX_STACK),
                            _NAMES)
    loader = _Loader(archive, infos, prefix, byteorder, path)
    loaded = _StateDictUnpickler(io.BytesIO(pickled), loader).load()
    return _state_dict(loaded, path)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{name: NumPy array} of the state dict that torch.save wrote to path (zip format), in
  PyTorch's layouts and dtypes (bfloat16 as ml_dtypes.bfloat16).

  Raises PthFileError (a UserError and ValueError) for any file it cannot read, naming the file
  and the reason: UnsafePickleError where the pickle names anything but tensors or uses them
  otherwise than torch.save does. Nothing else escapes, whatever the file holds (an interrupt
  does)."""
  path = os.fspath(path)
  try:
    return _read(path)
  except PthFileError:
    raise
  except MemoryError:
    raise PthFileError(
        f'{path}: ran out of memory while reading it (the limits of '
        'hml_jax.init_from.pth_files keep a file within a few times its size, so the '
        'machine has less memory than the weights need).') from None
  except Exception as e:  # pylint: disable=broad-except
    raise PthFileError(f'{path}: cannot be read as a state dict of torch.save '
                       f'({type(e).__name__}: {str(e)[:300]}). The file is damaged or was not '
                       'written by torch.save: download or save it again.') from e
