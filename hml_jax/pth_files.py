"""PyTorch .pth state dicts read without torch and without running pickled code.

torch.save writes a zip archive (the format of every torchvision weights file since PyTorch 1.6):

  <archive>/data.pkl     a pickle of the state dict, in which every tensor is the call
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                         and every storage a persistent id ('storage', torch.FloatStorage,
                         key, location, numel)
  <archive>/data/<key>   each storage's raw bytes
  <archive>/byteorder    'little' or 'big' (absent in older files: little)

A pickle may name any importable callable and have it called (`os.system` included), so
read_state_dict unpickles with find_class restricted to the few names above: each is answered
by a stand-in defined here that builds a NumPy array (torch is never imported), and any other
name is an error that names it. Nothing a pickle can name other than those runs, whatever the
file holds.
"""
import collections
import os
import pickle
import zipfile
from typing import Any, Dict

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a callable or class other than those of a tensor state dict."""


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


class _StorageType:
  """Stand-in for a torch.<Name>Storage class: only its element type is used. Immutable, so that
  a pickle's BUILD cannot change it."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'dtype', np.dtype(_STORAGE_DTYPES[name]))

  def __setattr__(self, key, value):
    raise UnsafePickleError(f'a pickle tried to set {key!r} of torch.{self.name}')


# A tensor may not hold more elements than this (2**31, 8 GiB of float32): a few bytes of pickle
# could otherwise ask for any amount of memory through zero strides.
MAX_ELEMENTS = 2**31


def _rebuild_tensor(storage,
                    storage_offset,
                    size,
                    stride,
                    requires_grad=False,
                    backward_hooks=None,
                    metadata=None):
  """Stand-in for torch._utils._rebuild_tensor_v2: the strided view of a storage, copied."""
  del requires_grad, backward_hooks, metadata  # a state dict's tensors need none of them
  if not isinstance(storage, np.ndarray):
    raise UnsafePickleError(f'a tensor is rebuilt from a {type(storage).__name__}, not from a '
                            'storage of the archive')
  size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
  if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f'a tensor of size {size} and stride {stride}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  if np.prod(size, dtype=np.float64) > MAX_ELEMENTS:
    raise pickle.UnpicklingError(f'a tensor of size {size}: more than {MAX_ELEMENTS} elements')
  last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or last >= storage.size:
    raise pickle.UnpicklingError(
        f'a tensor of size {size}, stride {stride} at offset {storage_offset} reaches element '
        f'{last} of a storage of {storage.size}')
  view = np.lib.stride_tricks.as_strided(storage[int(storage_offset):],
                                         shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride),
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  """Stand-in for torch._utils._rebuild_parameter (an nn.Parameter saved as such)."""
  del requires_grad, backward_hooks
  return data


def _allowed_names():
  """The names a state dict's pickle may hold, each answered by a stand-in made for this one
  load (so that nothing one file does to them reaches another load)."""

  def rebuild_tensor(*args, **kwargs):
    return _rebuild_tensor(*args, **kwargs)

  def rebuild_parameter(*args, **kwargs):
    return _rebuild_parameter(*args, **kwargs)

  return {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): rebuild_parameter,
      **{
          ('torch', name): _StorageType(name) for name in _STORAGE_DTYPES
      },
  }


class _StateDictUnpickler(pickle.Unpickler):
  """Admits only the names in _ALLOWED; reads each storage from the archive when referenced."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
    self.storages: Dict[Any, np.ndarray] = {}
    self.allowed = _allowed_names()

  def find_class(self, module, name):
    if (module, name) in self.allowed:
      return self.allowed[(module, name)]
    raise UnsafePickleError(
        f'{self.path}: refused to load {module}.{name}: a weights file may only hold tensors '
        "(torch's tensor rebuilds, storages and OrderedDict); this one names other code, which "
        'was not run. Use a state dict saved by torch.save(model.state_dict(), ...) from a '
        'source you trust.')

  def persistent_load(self, persistent_id):
    if (not isinstance(persistent_id, tuple) or len(persistent_id) != 5 or
        persistent_id[0] != 'storage' or not isinstance(persistent_id[1], _StorageType)):
      raise UnsafePickleError(f'{self.path}: an unexpected persistent id {persistent_id!r:.200}')
    _, storage_type, key, _, numel = persistent_id
    key = (str(key), storage_type.name, int(numel))
    if key not in self.storages:
      entry = f'{self.prefix}/data/{key[0]}'
      try:
        data = self.archive.read(entry)
      except KeyError as e:
        raise pickle.UnpicklingError(f'{self.path}: no storage {entry!r} in the archive') from e
      dtype = storage_type.dtype.newbyteorder('<' if self.byteorder == 'little' else '>')
      if len(data) != int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(
            f'{self.path}: storage {entry!r} holds {len(data)} bytes, not {numel} elements of '
            f'{storage_type.name}')
      self.storages[key] = np.frombuffer(data, dtype).astype(storage_type.dtype, copy=False)
    return self.storages[key]


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  pickles = [
      name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1
  ]
  if len(pickles) != 1:
    raise ValueError(f'{path}: not a torch.save archive (expected one <archive>/data.pkl, found '
                     f'{pickles[:5]}).')
  return pickles[0][:-len('/data.pkl')]


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{name: NumPy array} of the state dict that torch.save wrote to path (zip format), in
  PyTorch's layouts and dtypes (bfloat16 as ml_dtypes.bfloat16). Raises UnsafePickleError for a
  file whose pickle names anything but tensors, and ValueError for a file that is not a zip
  archive of torch.save or whose pickle is not a flat name -> tensor mapping."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f'{path}: not a zip archive. PyTorch writes .pth files as zip archives since 1.6; an '
        'older file (or one made with _use_new_zipfile_serialization=False) is read only by '
        'torch: convert it once where torch is installed (hml_jax/pretrained.py says how).')
  with zipfile.ZipFile(path) as archive:
    prefix = _archive_prefix(archive, path)
    byteorder = 'little'
    if f'{prefix}/byteorder' in archive.namelist():
      byteorder = archive.read(f'{prefix}/byteorder').decode('ascii').strip()
      if byteorder not in ('little', 'big'):
        raise ValueError(f'{path}: unknown byte order {byteorder!r}.')
    with archive.open(f'{prefix}/data.pkl') as file:
      loaded: Any = _StateDictUnpickler(file, archive, prefix, byteorder, path).load()
  if not isinstance(loaded, dict):
    raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict.')
  not_tensors = sorted(
      str(name) for name, value in loaded.items() if not isinstance(value, np.ndarray))
  if not_tensors:
    raise ValueError(f'{path} is not a flat state dict (name -> tensor): entries '
                     f'{not_tensors[:10]} are not tensors (a training checkpoint? save its '
                     "model's state_dict() instead).")
  return {str(name): value for name, value in loaded.items()}
