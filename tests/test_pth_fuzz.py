"""Hostile .pth files against hml_jax/init_from/pth_files.py: hand-made attacks (fast tier) and a seeded
mutation fuzzer (slow tier). Whatever a file holds, read_state_dict either raises PthFileError
naming the file, having run nothing, or returns arrays that hold only the elements of the
archive's storages, in total at most MAX_VIEW_FACTOR times their bytes, within bounded memory.

The builders here make archives as torch.save does without torch: a pickler that resolves
torch's names to stand-in modules installed only while it pickles. tests/fuzz_pth.py (the
coverage-guided campaign) seeds its corpus from valid_archives() and hostile_archives() and
mutates with mutate().

Run as a script (python tests/test_pth_fuzz.py SEED COUNT OUT_DIR), this file is the child
process of the slow test: it fuzzes under an address-space limit and prints a JSON summary.
"""
import collections
import contextlib
import io
import itertools
import json
import math
import os
import pickle
import pickletools
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import tracemalloc
import types
import warnings
import zipfile
import zlib
from typing import Dict, Tuple

from hypothesis import given, settings, strategies as st
import ml_dtypes
import numpy as np
import pytest

if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hml_jax.init_from import torchvision, pth_files  # pylint: disable=g-import-not-at-top

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
PTH = os.path.join(FIXTURES, 'torchvision_resnet_small.pth')  # tests/fixtures/make_pth_fixture.py

_DTYPES = {
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
_TYPE_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}

# Pickling as torch does, without torch.


def _fake_torch() -> Dict:
  """Modules torch and torch._utils holding only the names torch.save pickles."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')
  for name in ('_rebuild_tensor_v2', '_rebuild_parameter'):

    def function(*args):
      raise AssertionError('only pickled, never called')

    function.__module__, function.__name__, function.__qualname__ = 'torch._utils', name, name
    setattr(utils, name, function)
  for name in _DTYPES:
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  torch._utils = utils  # pylint: disable=protected-access
  return {'torch': torch, 'torch._utils': utils}


_TORCH = _fake_torch()


@contextlib.contextmanager
def _torch_names():
  """The stand-in torch modules in sys.modules while pickling (a real torch is put back)."""
  saved = {name: sys.modules.get(name) for name in _TORCH}
  sys.modules.update(_TORCH)
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


class _Storage:
  """A storage, pickled as torch does: by the persistent id ('storage', torch.<Type>Storage, key,
  location, numel), or by `pid` where a case needs another one."""

  def __init__(self, key: str, array: np.ndarray, pid=None):
    self.key, self.array, self.pid = key, array, pid
    self.type_name = _TYPE_NAMES[array.dtype]

  def persistent_id(self):
    if self.pid is not None:
      return self.pid
    return ('storage', getattr(_TORCH['torch'], self.type_name), self.key, 'cpu', self.array.size)


class _Tensor:
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    return (
        _TORCH['torch._utils']._rebuild_tensor_v2,  # pylint: disable=protected-access
        (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))

  def reference(self) -> np.ndarray:
    """What the storage's elements say this tensor is, element by element (no NumPy views)."""
    flat = self.storage.array
    out = np.empty(self.size, flat.dtype)
    if not out.size:  # product() would first make a tuple of every range, (2**31, 0) included
      return out
    for index in itertools.product(*map(range, self.size)):
      out[index] = flat[self.offset + sum(i * s for i, s in zip(index, self.stride))]
    return out


class _Pickler(pickle.Pickler):

  def persistent_id(self, obj):  # pylint: disable=arguments-renamed
    return obj.persistent_id() if isinstance(obj, _Storage) else None


def _pickle(obj, protocol: int = 2) -> bytes:
  buffer = io.BytesIO()
  with _torch_names():
    _Pickler(buffer, protocol=protocol).dump(obj)
  return buffer.getvalue()


def _zip(entries, compression=zipfile.ZIP_STORED) -> bytes:
  """A zip of (name, bytes[, method]) entries, duplicates allowed."""
  buffer = io.BytesIO()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # duplicate names
    with zipfile.ZipFile(buffer, 'w') as archive:
      for name, data, *method in entries:
        archive.writestr(name, data, compress_type=method[0] if method else compression)
  return buffer.getvalue()


def _stored_bytes(array: np.ndarray, byteorder: str) -> bytes:
  return array.astype(array.dtype.newbyteorder('<' if byteorder == 'little' else '>')).tobytes()


def _archive(state,
             storages=(),
             byteorder='little',
             prefix='archive',
             compression=zipfile.ZIP_STORED,
             pickled=None) -> bytes:
  """torch.save's zip of `state` (its _Tensors' _Storages given in `storages`)."""
  entries = [(f'{prefix}/data.pkl', _pickle(state) if pickled is None else pickled)]
  if byteorder is not None:
    entries.append((f'{prefix}/byteorder', byteorder))
  for storage in storages:
    entries.append(
        (f'{prefix}/data/{storage.key}', _stored_bytes(storage.array, byteorder or 'little')))
  return _zip(entries, compression)


def _valid_state():
  """A state dict as a module's state_dict(): every storage type, views at offsets, transposes,
  strided and overlapping views, a scalar, an empty tensor, tied names, _metadata."""
  rng = np.random.default_rng(0)
  storages = [
      _Storage('0',
               np.arange(24, dtype=np.float32) - 3.5),
      _Storage('1',
               np.arange(6, dtype=np.int64) * 2**40),
      _Storage('2',
               rng.normal(size=7).astype(np.float16)),
      _Storage('3', np.array([True, False, True])),
      _Storage('4',
               rng.normal(size=6).astype(ml_dtypes.bfloat16)),
      _Storage('5',
               np.arange(5, dtype=np.uint8) + 250),
      _Storage('6', rng.normal(size=3)),
      _Storage('7',
               np.arange(4, dtype=np.int32) - 2),
      _Storage('8',
               np.arange(4, dtype=np.int16) - 2),
      _Storage('9',
               np.arange(4, dtype=np.int8) - 2),
  ]
  s = storages
  w = _Tensor(s[0], 0, (4, 6), (6, 1))
  state = collections.OrderedDict([
      ('w', w),
      ('w_t', _Tensor(s[0], 0, (6, 4), (1, 6))),
      ('rows', _Tensor(s[0], 6, (2, 6), (6, 1))),
      ('every_other', _Tensor(s[0], 1, (4, 3), (6, 2))),
      ('sliding', _Tensor(s[0], 2, (3, 3), (1, 1))),  # overlapping rows, within the bound
      ('tied', w),
      ('count', _Tensor(s[1], 5, (), ())),
      ('longs', _Tensor(s[1], 0, (6,), (1,))),
      ('half', _Tensor(s[2], 0, (7,), (1,))),
      ('mask', _Tensor(s[3], 0, (3,), (1,))),
      ('bf16', _Tensor(s[4], 0, (2, 3), (3, 1))),
      ('bytes', _Tensor(s[5], 0, (5,), (1,))),
      ('double', _Tensor(s[6], 0, (3, 1), (1, 1))),
      ('int', _Tensor(s[7], 0, (4,), (1,))),
      ('short', _Tensor(s[8], 1, (3,), (1,))),
      ('char', _Tensor(s[9], 0, (2, 2), (2, 1))),
      ('empty', _Tensor(s[0], 24, (0, 4), (4, 1))),
  ])
  state._metadata = collections.OrderedDict([('', {'version': 1})])  # pylint: disable=protected-access
  return state, storages


def valid_archives() -> Dict[str, bytes]:
  """Small archives that read: the seeds of the fuzzers."""
  state, storages = _valid_state()
  one = _Storage('0', np.arange(6, dtype=np.float32))
  return {
      'valid_little': _archive(state, storages),
      'valid_big': _archive(state, storages, byteorder='big'),
      'valid_no_byteorder': _archive(state, storages, byteorder=None),
      'valid_deflated': _archive(state, storages, compression=zipfile.ZIP_DEFLATED),
      'valid_one': _archive({'w': _Tensor(one, 0, (3, 2), (2, 1))}, [one]),
      'valid_protocol4': _archive(state, storages, pickled=_pickle(state, protocol=4)),
  }


# Hand-made pickles: opcodes assembled (protocol 2).


def _op_int(value: int) -> bytes:
  if 0 <= value < 256:
    return b'K' + bytes([value])
  if 0 <= value < 65536:
    return b'M' + struct.pack('<H', value)
  if -2**31 <= value < 2**31:
    return b'J' + struct.pack('<i', value)
  data = pickle.encode_long(value)
  return b'\x8a' + bytes([len(data)]) + data


def _op_str(text: str) -> bytes:
  data = text.encode()
  return b'X' + struct.pack('<I', len(data)) + data


def _op_global(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _calls(module: str, name: str, *args: bytes) -> bytes:
  """A pickle whose result is module.name(*args) (args as opcodes)."""
  return b'\x80\x02' + _op_global(module, name) + b'(' + b''.join(args) + b'tR.'


def _stack_global_call(module: str, name: str, *args: bytes) -> bytes:
  return (b'\x80\x04' + _op_str(module) + b'\x94' + _op_str(name) + b'\x94\x93\x94(' +
          b''.join(args) + b'tR.')


def _patch_entry(data: bytes, name: str, **fields) -> bytes:
  """The zip with fields (flags, method, crc, csize, usize, offset) of the central directory
  record, and of the local header, of entry `name` set to the values given."""
  central = {
      'flags': (8, 'H'),
      'method': (10, 'H'),
      'crc': (16, 'I'),
      'csize': (20, 'I'),
      'usize': (24, 'I'),
      'offset': (42, 'I')
  }
  local = {'flags': 6, 'method': 8, 'crc': 14, 'csize': 18, 'usize': 22}
  out = bytearray(data)
  eocd = out.rindex(b'PK\x05\x06')
  count, _, start = struct.unpack_from('<HII', out, eocd + 10)
  position = start
  for _ in range(count):
    name_length, extra_length, comment_length = struct.unpack_from('<HHH', out, position + 28)
    entry_name = bytes(out[position + 46:position + 46 + name_length]).decode()
    header = struct.unpack_from('<I', out, position + 42)[0]
    if entry_name == name:
      for field, value in fields.items():
        offset, code = central[field]
        struct.pack_into('<' + code, out, position + offset, value)
        if field in local:
          struct.pack_into('<' + code, out, header + local[field], value)
    position += 46 + name_length + extra_length + comment_length
  return bytes(out)


def _deflate_bomb(mib: int, declared=None) -> bytes:
  """A FloatStorage entry of `mib` MiB of zeros, deflated (about 1 KB per MiB); `declared`, if
  given, is the uncompressed size the zip directory states instead."""
  numel = (mib * 2**20 if declared is None else declared) // 4
  pickled = _pickle({
      'w':
          _Tensor(
              _Storage('0',
                       np.zeros(0, np.float32),
                       pid=('storage', _TORCH['torch'].FloatStorage, '0', 'cpu', numel)), 0,
              (numel,), (1,))
  })
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('archive/data.pkl', pickled)
    archive.writestr('archive/byteorder', 'little')
    info = zipfile.ZipInfo('archive/data/0')
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, 'w') as entry:
      chunk = bytes(2**20)
      for _ in range(mib):
        entry.write(chunk)
  data = buffer.getvalue()
  if declared is not None:
    data = _patch_entry(data, 'archive/data/0', usize=declared, crc=zlib.crc32(bytes(declared)))
  return data


def hostile_archives(marker: str) -> Dict[str, Tuple[bytes, str]]:
  """{case: (archive bytes, regex the PthFileError's message must match)}. A pickle that would
  run code creates `marker` if it runs."""
  # pylint: disable=too-many-locals,too-many-statements
  f32 = np.arange(16, dtype=np.float32)
  s0 = _Storage('0', f32)
  torch = _TORCH['torch']

  def one(tensor, storages=(s0,), **kwargs):
    return _archive({'w': tensor}, storages, **kwargs)

  tensor_0 = _Tensor(s0, 0, (4,), (1,))

  def pid(*fields):
    return _Storage('0', f32, pid=fields)

  cases = {}
  # (a) a tensor as the storage of another: 2-D, at an offset.
  first = _Tensor(s0, 0, (4,), (1,))
  cases['tensor_as_storage'] = (_archive({
      'a': first,
      'b': _Tensor(first, 3, (64, 64), (64, 1))
  }, [s0]), 'rebuilds a tensor from a _Tensor, not from a storage of the archive')
  cases['parameter_as_storage'] = (_archive(
      {'b': _Tensor(_Tensor(s0, 0, (4,), (1,)), 2, (2, 2), (2, 1))}, [s0]), 'from a _Tensor')
  cases['list_as_storage'] = (one(_Tensor([1.0] * 4, 1, (2, 2), (2, 1))), 'from a list')
  cases['bytes_as_storage'] = (_archive(None, [s0],
                                        pickled=_pickle(
                                            {'w': _Tensor(b'\0' * 64, 1, (2, 2), (2, 1))},
                                            protocol=3)), 'from a bytes')
  # (b) views that repeat elements: zero and overlapping strides.
  cases['zero_strides'] = (one(_Tensor(s0, 0, (2**14, 2**13), (0, 0))),
                           r'tensors would take 536870912 bytes.*MAX_VIEW_FACTOR')
  big = _Storage('0', np.zeros(2**13, np.float32))
  cases['overlapping_strides'] = (one(_Tensor(big, 0, (2**12, 2**12), (1, 1)), [big]),
                                  r'tensors would take 67108864 bytes.*4x the 32768 bytes')
  cases['many_small_views'] = (_archive({f'v{i}': _Tensor(s0, 0, (16,), (1,)) for i in range(5)},
                                        [s0]), r'tensors would take 320 bytes.*4x the 64 bytes')
  cases['beyond_max_bytes'] = (one(_Tensor(s0, 0, (2**20, 2**20, 2**20),
                                           (0, 0, 0))), 'more than MAX_BYTES')
  cases['zero_dim_hides_size'] = (one(_Tensor(s0, 0, (0, 2**62, 2**62),
                                              (0, 0, 0))), 'more than MAX_BYTES')
  # (c) deflate bombs, small enough for a corpus (test_deflate_bomb_* has the large ones).
  cases['deflate_bomb_small'] = (_deflate_bomb(48), 'deflate bomb')
  # (d) deep nesting, with and without a deep stack.
  n = 100000
  cases['nested_tuples_mark'] = (b'\x80\x02' + b'(' * n + b']' + b't' * n + b'.', 'MAX_STACK')
  cases['nested_tuple1'] = (b'\x80\x02]' + b'\x85' * n + b'.', 'MAX_NESTING')
  cases['nested_lists'] = (b'\x80\x02' + b']' * 60000 + b'a' * 59999 + b'.', 'MAX_NESTING')
  cases['nested_dicts'] = (b'\x80\x02}' + b'K\x00}' * 30000 + b's' * 30000 + b'.', 'MAX_NESTING')
  cases['nested_dicts_in_state'] = (_pickle({'w': _nested_dicts(200)}), 'MAX_NESTING')
  cases['many_marks'] = (b'\x80\x02' + b'(' * n + b'.', 'MAX_STACK')
  # The zip archive.
  good = _archive({'w': _Tensor(s0, 0, (4, 4), (4, 1))}, [s0])
  cases['missing_storage'] = (_archive({'w': _Tensor(s0, 0, (4, 4), (4, 1))}),
                              "no storage 'archive/data/0' in the archive")
  cases['duplicate_pickle'] = (_zip([('archive/data.pkl', _calls('os', 'system', _op_str('x'))),
                                     ('archive/data.pkl', _pickle({}))]),
                               "two entries are named 'archive/data.pkl'")
  cases['duplicate_storage'] = (_zip([
      ('archive/data.pkl', _pickle({'w': _Tensor(s0, 0, (4,), (1,))})),
      ('archive/data/0', f32.tobytes()), ('archive/data/0', b'\0' * 64)
  ]), "two entries are named 'archive/data/0'")
  cases['storage_longer_than_numel'] = (one(
      _Tensor(pid('storage', torch.FloatStorage, '0', 'cpu', 8), 0, (8,),
              (1,))), 'holds 64 bytes, not 8 elements of FloatStorage')
  cases['storage_shorter_than_numel'] = (one(
      _Tensor(pid('storage', torch.FloatStorage, '0', 'cpu', 17), 0, (8,),
              (1,))), 'holds 64 bytes, not 17 elements')
  cases['storage_declared_twice'] = (_archive(
      {
          'a': _Tensor(s0, 0, (4,), (1,)),
          'b': _Tensor(pid('storage', torch.IntStorage, '0', 'cpu', 16), 0, (4,), (1,))
      }, [s0]), 'declared as 16 elements of FloatStorage and as 16 of IntStorage')
  cases['encrypted'] = (_patch_entry(good, 'archive/data/0', flags=1), 'is encrypted')
  cases['strong_encryption'] = (_patch_entry(good, 'archive/data.pkl', flags=0x40), 'encrypted')
  cases['bzip2'] = (_archive({'w': _Tensor(s0, 0, (4,), (1,))}, [s0],
                             compression=zipfile.ZIP_BZIP2), 'zip method 12')
  cases['lzma'] = (_archive({'w': _Tensor(s0, 0, (4,), (1,))}, [s0],
                            compression=zipfile.ZIP_LZMA), 'zip method 14')
  cases['unknown_method'] = (_patch_entry(good, 'archive/data/0', method=99), 'zip method 99')
  cases['truncated_end'] = (good[:-10], 'cut short or damaged')
  cases['truncated_half'] = (good[:len(good) // 2], 'cut short or damaged')
  cases['truncated_one_byte'] = (good[:-1], 'cut short or damaged')
  cases['truncated_to_magic'] = (good[:4], 'cut short or damaged')
  cut = good.index(f32.tobytes())
  cases['spliced_out_storage'] = (good[:cut] + good[cut + 32:], 'damaged')
  cases['bad_crc_storage'] = (_patch_entry(good, 'archive/data/0', crc=0), 'Bad CRC-32')
  cases['bad_crc_pickle'] = (_patch_entry(good, 'archive/data.pkl', crc=1), 'Bad CRC-32')
  cases['stored_sizes_differ'] = (_patch_entry(good, 'archive/data/0', csize=32),
                                  'has 32 bytes in the file but 64 uncompressed')
  cases['entry_past_end'] = (_patch_entry(good, 'archive/data/0', csize=2**31,
                                          usize=2**31), 'reaches past the end of the file')
  cases['header_offset_past_end'] = (_patch_entry(good, 'archive/data/0', offset=2**31), 'past')
  cases['entry_sizes_overlap'] = (_patch_entry(good, 'archive/data/0', offset=0), 'damaged')
  cases['byteorder_middle'] = (one(_Tensor(s0, 0, (4,), (1,)),
                                   byteorder='middle'), "unknown byte order 'middle'")
  cases['byteorder_long'] = (one(_Tensor(s0, 0, (4,), (1,)),
                                 byteorder='little' * 3), 'byteorder entry has 18 bytes')
  cases['byteorder_binary'] = (one(_Tensor(s0, 0, (4,), (1,)),
                                   byteorder=b'\xff\xfe'), 'unknown byte order')
  cases['no_pickle'] = (_zip([('archive/data/0', f32.tobytes())]), 'not a torch.save archive')
  cases['two_pickles'] = (_zip([('a/data.pkl', _pickle({})),
                                ('b/data.pkl', _pickle({}))]), 'not a torch.save archive')
  cases['empty_zip'] = (_zip([]), 'not a torch.save archive')
  cases['not_a_zip'] = (pickle.dumps({'w': 1}), 'not a zip archive')
  cases['empty_file'] = (b'', 'not a zip archive')
  # Persistent ids that are not a storage of this archive.
  for name, fields in {
      'pid_short': ('storage', torch.FloatStorage, '0', 'cpu'),
      'pid_long': ('storage', torch.FloatStorage, '0', 'cpu', 16, 0),
      'pid_module': ('module', 'os'),
      'pid_not_storage_kind': ('strage', torch.FloatStorage, '0', 'cpu', 16),
      'pid_type_is_str': ('storage', 'FloatStorage', '0', 'cpu', 16),
      'pid_type_is_class': ('storage', collections.OrderedDict, '0', 'cpu', 16),
      'pid_key_path': ('storage', torch.FloatStorage, '../0', 'cpu', 16),
      'pid_key_slash': ('storage', torch.FloatStorage, 'data/0', 'cpu', 16),
      'pid_key_empty': ('storage', torch.FloatStorage, '', 'cpu', 16),
      'pid_key_int': ('storage', torch.FloatStorage, 0, 'cpu', 16),
      'pid_location_int': ('storage', torch.FloatStorage, '0', 0, 16),
      'pid_numel_negative': ('storage', torch.FloatStorage, '0', 'cpu', -16),
      'pid_numel_bool': ('storage', torch.FloatStorage, '0', 'cpu', True),
      'pid_numel_float': ('storage', torch.FloatStorage, '0', 'cpu', 16.0),
      'pid_numel_huge': ('storage', torch.FloatStorage, '0', 'cpu', 2**64),
  }.items():
    cases[name] = (one(_Tensor(pid(*fields), 0, (4,), (1,))), 'unexpected persistent id')
  # The pickler writes a list id as a tuple: a list made by hand.
  listed = _pickle({
      'w': tensor_0
  }).replace(b'(X\x07\x00\x00\x00storage',
             b'](X\x07\x00\x00\x00storage').replace(b'K\x10t', b'K\x10e', 1)
  cases['pid_list'] = (_archive(None, [s0], pickled=listed), 'unexpected persistent id')
  # Offsets, sizes and strides torch never writes.
  for name, (offset, size, stride) in {
      'offset_negative': (-1, (4,), (1,)),
      'offset_huge': (2**64, (4,), (1,)),
      'offset_float': (0.0, (4,), (1,)),
      'offset_bool': (True, (4,), (1,)),
      'size_negative': (0, (-1, 4), (4, 1)),
      'size_float': (0, (4.0,), (1,)),
      'size_bool': (0, (True, 4), (4, 1)),
      'size_huge': (0, (2**63,), (1,)),
      'size_list': (0, [4], (1,)),
      'size_int': (0, 4, 1),
      'size_none': (0, None, None),
      'stride_negative': (15, (4,), (-1,)),
      'stride_huge': (0, (2,), (2**70,)),
      'stride_float': (0, (4,), (1.0,)),
      'stride_missing': (0, (4, 4), (1,)),
      'too_many_dims': (0, (1,) * 33, (1,) * 33),
  }.items():
    cases[name] = (one(_Tensor(s0, offset, size, stride)), 'expected tuples of at most 32')
  for name, (offset, size, stride) in {
      'offset_past_storage': (17, (0,), (1,)),
      'view_past_storage': (1, (4, 4), (4, 1)),
      'stride_past_storage': (0, (2,), (16,)),
      'big_stride_one_row': (0, (1, 2), (2**40, 2**40)),
  }.items():
    cases[name] = (one(_Tensor(s0, offset, size, stride)), 'reaches element')
  cases['rebuild_few_args'] = (
      _archive(
          {'w': _Rebuild(_TORCH['torch._utils']._rebuild_tensor_v2, (s0, 0, (4,)))},  # pylint: disable=protected-access
          [s0]),
      'calls _rebuild_tensor_v2 with 3 arguments')
  cases['parameter_of_storage'] = (
      _archive(
          {'w': _Rebuild(_TORCH['torch._utils']._rebuild_parameter, (s0, False))},  # pylint: disable=protected-access
          [s0]),
      '_rebuild_parameter with other than a tensor')
  cases['ordered_dict_with_args'] = (_calls('collections', 'OrderedDict',
                                            b']'), 'calls OrderedDict with 1 arguments')
  # The memo.
  cases['binget_unset'] = (b'\x80\x02h\x05.', 'reads memo index 5')
  cases['long_binget_unset'] = (b'\x80\x02j\xff\xff\xff\x7f.', 'reads memo index 2147483647')
  cases['binput_out_of_order'] = (b'\x80\x02}q\x07.', 'memoizes at index 7 after 0')
  cases['binput_empty_stack'] = (b'\x80\x02q\x00}.', 'memoizes an item its stack does not have')
  cases['memoize_then_get_other'] = (b'\x80\x04}\x94h\x01.', 'reads memo index 1')
  cases['change_after_insert'] = (b'\x80\x02]q\x00]q\x01h\x00h\x01ah\x01K\x01a0.',
                                  'after putting it')
  # Names: nothing but tensors' runs. Each would create the marker.
  command = _op_str(f'touch {marker}')
  code = _op_str(f'open({marker!r}, "w")')
  for name, (module, attribute, args) in {
      'os_system': ('os', 'system', command),
      'posix_system': ('posix', 'system', command),
      'subprocess_call': ('subprocess', 'call', command),
      'builtins_eval': ('builtins', 'eval', code),
      'builtins_exec': ('builtins', 'exec', code),
      'builtin_eval_py2': ('__builtin__', 'eval', code),
      'builtins_getattr': ('builtins', 'getattr', _op_str('x') + _op_str('upper')),
      'numpy_reconstruct': ('numpy.core.multiarray', '_reconstruct', b''),
      'numpy_frombuffer': ('numpy', 'frombuffer', b'C\x04\x00\x00\x00\x00'),
      'numpy_load': ('numpy', 'load', _op_str(marker)),
      'torch_load': ('torch', 'load', _op_str(marker)),
      'torch_rebuild_v1': ('torch._utils', '_rebuild_tensor', b''),
      'torch_rebuild_numpy': ('torch._utils', '_rebuild_device_tensor_from_numpy', b''),
      'torch_tensor': ('torch', 'Tensor', b''),
      'collections_defaultdict': ('collections', 'defaultdict', b''),
      'ordered_dict_spaced': ('collections', 'OrderedDict ', b''),
      'storage_of_other_module': ('torch.nn', 'FloatStorage', b''),
  }.items():
    cases[name] = (_calls(module, attribute, args), rf'refused to load {module}\.{attribute}')
    cases[f'{name}_stack_global'] = (_stack_global_call(module, attribute, args),
                                     rf'refused to load {module}\.{attribute}')
  cases['code_inside_state'] = (_pickle({
      'w': _Tensor(s0, 0, (4,), (1,)),
      'x': _Rebuild(os.system, (f'touch {marker}',))
  }), r'refused to load (os|posix)\.system')
  cases['stack_global_not_strings'] = (b'\x80\x04K\x01K\x02\x93.', 'other than two strings')
  # Calls and attributes on the allowed names, as torch.save never makes them.
  cases['reduce_storage_type'] = (_calls('torch', 'FloatStorage',
                                         _op_int(10)), 'calls torch.FloatStorage')
  cases['reduce_string'] = (b'\x80\x02X\x01\x00\x00\x00a)R.', "calls the string 'a'")
  cases['reduce_args_not_tuple'] = (b'\x80\x02' + _op_global('collections', 'OrderedDict') + b']R.',
                                    'with a list as its arguments')
  cases['build_storage_type'] = (b'\x80\x02' + _op_global('torch', 'FloatStorage') +
                                 b'N}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xs\x86b.',
                                 'BUILD .* to torch.FloatStorage')
  cases['build_tensor'] = (_pickle(_Tensor(s0, 0, (4,), (1,)))[:-1] + b'}b.', 'BUILD')
  cases['build_ordered_dict_list'] = (_calls('collections', 'OrderedDict')[:-1] + b']b.',
                                      'attributes of an OrderedDict from a list')
  cases['persistent_id_unpickled'] = (b'\x80\x02X\x01\x00\x00\x00xQ.', 'unexpected persistent')
  # Opcodes outside a state dict's.
  for name, pickled in {
      'protocol_0': b'(dp0\n.',
      'inst': b'\x80\x02(ios\nsystem\nX\x01\x00\x00\x00xo.',
      'newobj': b'\x80\x02' + _op_global('collections', 'OrderedDict') + b')\x81.',
      'ext': b'\x80\x02\x82\x01.',
      'frozenset': b'\x80\x04(\x91.',
      'bytearray': b'\x80\x05\x96\x00\x00\x00\x00\x00\x00\x00\x00.',
      'next_buffer': b'\x80\x05\x97.',
      'pop': b'\x80\x02}}0.',
      'dup': b'\x80\x02}2.',
      'long4': b'\x80\x02\x8b\x00\x01\x00\x00' + b'\x01' * 256 + b'.',
  }.items():
    cases[f'opcode_{name}'] = (pickled, 'refused|has opcode|malformed|protocol')
  cases['protocol_late'] = (b'\x80\x02}\x80\x02.', 'declares protocol 2 at byte 3')
  cases['frame_past_end'] = (b'\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00}.', 'frame of 255')
  cases['bytes_after_stop'] = (b'\x80\x02}.}', 'has 1 bytes after its end')
  cases['no_stop'] = (b'\x80\x02}', 'does not end|malformed')
  cases['two_results'] = (b'\x80\x02}}.', 'ends with 2 items')
  cases['pickle_garbage'] = (b'\x80\x02\xff\xfe.', 'malformed')
  cases['setitems_odd'] = (b'\x80\x02}(K\x01u.', 'a key but no value')
  cases['append_to_dict'] = (b'\x80\x02}K\x01a.', 'applies APPEND to a dict')
  cases['mark_unset'] = (b'\x80\x02}t.', 'MARK that it has not set')
  cases['pop_empty'] = (b'\x80\x02\x85.', 'takes an item its stack does not have')
  # What the pickle returns.
  tensor = _Tensor(s0, 0, (4,), (1,))
  for name, (state, match) in {
      'result_list': ([tensor], 'holds a list, not a state dict'),
      'result_tensor': (tensor, 'holds a tensor, not a state dict'),
      'result_none': (None, 'holds a NoneType'),
      'result_string': ('w', 'holds a str'),
      'key_int': ({
          0: tensor
      }, r'its keys \[0\] are not names'),
      'key_tuple': ({
          ('w',): tensor
      }, 'are not names'),
      'key_none': ({
          None: tensor
      }, 'are not names'),
      'value_int': ({
          'w': tensor,
          'step': 3
      }, r"entries \['step'\] are not tensors"),
      'value_dict': ({
          'model': {
              'w': tensor
          }
      }, 'a training checkpoint'),
      'value_list': ({
          'w': [tensor]
      }, 'are not tensors'),
  }.items():
    cases[name] = (_archive(state, [s0]), match)
  cases['key_bytes'] = (_archive(None, [s0], pickled=_pickle({b'w': tensor},
                                                             protocol=3)), 'are not names')
  cases['key_list_unhashable'] = (b'\x80\x02}]K\x01s.', 'unhashable')
  cases['self_containing_dict'] = (b'\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.', 'not tensors')
  for name, (pickled, match) in list(cases.items()):
    if not pickled.startswith(b'PK') and name not in ('not_a_zip', 'empty_file'):
      cases[name] = (_archive(None, [s0], pickled=pickled), match)
  return cases


class _Rebuild:
  """Pickles as function(*args): calls torch.save never writes."""

  def __init__(self, function, args):
    self.function, self.args = function, args

  def __reduce__(self):
    return (self.function, self.args)


def _nested_dicts(depth: int):
  """{'a': {'a': ... {}}} nested `depth` deep."""
  value = {}
  for _ in range(depth):
    value = {'a': value}
  return value


# The fast tier: each hand-made case.

_MARKER = 'pickled_code_ran'  # relative: each test runs in its own directory
_CASES = hostile_archives(_MARKER)


def _write(tmp_path, name: str, data: bytes) -> str:
  path = tmp_path / f'{name}.pth'
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize('case', sorted(_CASES))
def test_a_hostile_archive_is_a_pth_file_error_naming_the_file(tmp_path, monkeypatch, case):
  monkeypatch.chdir(tmp_path)
  data, match = _CASES[case]
  path = _write(tmp_path, case, data)
  with pytest.raises(pth_files.PthFileError) as raised:
    pth_files.read_state_dict(path)
  message = str(raised.value)
  assert message.startswith(path) and re.search(match, message), message
  assert not (tmp_path / _MARKER).exists()


def test_valid_archives_read_as_their_storages_say(tmp_path):
  """Every dtype, byte order, view, offset, transpose and tied name against an element-by-element
  reference of the storages' values."""
  for byteorder in ('little', 'big', None):
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      state, storages = _valid_state()
      path = _write(tmp_path, f'valid_{byteorder}_{compression}',
                    _archive(state, storages, byteorder=byteorder, compression=compression))
      loaded = pth_files.read_state_dict(path)
      assert list(loaded) == list(state)
      for name, tensor in state.items():
        expected = tensor.reference()
        assert loaded[name].dtype == expected.dtype and loaded[name].shape == expected.shape
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)
  # Big-endian bytes labelled little are read as little-endian: what the bytes say.
  storage = _Storage('0', np.arange(4, dtype=np.float32) + 1)
  data = _zip([('archive/data.pkl', _pickle({'w': _Tensor(storage, 0, (4,), (1,))})),
               ('archive/byteorder', 'little'),
               ('archive/data/0', storage.array.astype('>f4').tobytes())])
  np.testing.assert_array_equal(
      pth_files.read_state_dict(_write(tmp_path, 'mislabelled', data))['w'],
      np.frombuffer(storage.array.astype('>f4').tobytes(), '<f4'))


_COUNTS = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**62, 2**63, 2**64]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(offset=_COUNTS, dims=st.lists(st.tuples(_COUNTS, _COUNTS), max_size=4))
def test_a_view_is_what_its_storage_says_or_an_error(offset, dims):
  """Any offset, sizes and strides over a 20-element storage: refused unless every element lies
  in the storage (and within MAX_VIEW_FACTOR and MAX_BYTES), else equal to the element-by-element reference."""
  size, stride = tuple(n for n, _ in dims), tuple(s for _, s in dims)
  storage = _Storage('0', np.arange(20, dtype=np.int32) * 3 - 7)
  tensor = _Tensor(storage, offset, size, stride)
  data = _archive({'w': tensor}, [storage])
  numel = math.prod(size)
  counts = all(0 <= value <= 2**62 for value in (offset,) + size + stride)
  inside = counts and (offset + sum((n - 1) * s for n, s in dims) < 20 if numel else offset <= 20)
  # An empty tensor is refused too when its other sizes' product passes MAX_BYTES.
  nominal = math.prod(max(n, 1) for n in size) * 4
  valid = inside and numel * 4 <= pth_files.MAX_VIEW_FACTOR * 80 and nominal <= pth_files.MAX_BYTES
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, 'view.pth')
    with open(path, 'wb') as f:
      f.write(data)
    if not valid:
      with pytest.raises(pth_files.PthFileError, match=re.escape(path)):
        pth_files.read_state_dict(path)
      return
    loaded = pth_files.read_state_dict(path)['w']
  np.testing.assert_array_equal(loaded, tensor.reference())
  assert loaded.dtype == np.int32 and loaded.shape == size


def _traced_peak(function):
  """The result of function() (or the exception it raised) and the peak bytes it allocated."""
  tracemalloc.start()
  try:
    try:
      result = function()
    except Exception as e:  # pylint: disable=broad-except
      result = e
    return result, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


@pytest.fixture(scope='module')
def deflate_bomb():
  return _deflate_bomb(320)  # 320 MiB of zeros in about 320 KB


def test_a_deflate_bomb_is_refused_before_decompressing(tmp_path, deflate_bomb):
  assert len(deflate_bomb) < 400 * 2**10
  path = _write(tmp_path, 'bomb', deflate_bomb)
  raised, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert isinstance(raised, pth_files.PthFileError)
  with zipfile.ZipFile(io.BytesIO(deflate_bomb)) as archive:
    total = sum(info.file_size for info in archive.infolist())
  assert total > 320 * 2**20
  assert str(raised).startswith(f'{path}: its entries would take {total} bytes uncompressed')
  assert 'deflate bomb' in str(raised) and peak < 4 * 2**20, peak
  # The same through the loader of config.init_from.
  with pytest.raises(pth_files.PthFileError, match=r'bomb\.pth: .*deflate bomb'):
    torchvision.load_state_dict(path)


def test_a_deflate_stream_longer_than_its_entry_is_refused_after_its_declared_bytes(tmp_path):
  """A directory that declares 64 bytes (and their CRC) for a 320 MiB stream: the bounded read
  decompresses 65 bytes and refuses the entry (zipfile alone stops at the declared size)."""
  path = _write(tmp_path, 'lying', _deflate_bomb(320, declared=64))
  raised, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert isinstance(raised, pth_files.PthFileError), raised
  # The 65th byte ends what the directory declares: its CRC no longer matches.
  assert str(raised).startswith(f"{path}: entry 'archive/data/0' cannot be read (BadZipFile: Bad "
                                "CRC-32 for file 'archive/data/0')")
  assert peak < 4 * 2**20, peak


def _deflated_pickle(pickled: bytes) -> bytes:
  return _zip([('archive/data.pkl', pickled, zipfile.ZIP_DEFLATED)])


def test_a_pickle_that_only_memoizes_takes_memory_bounded_by_its_pickle(tmp_path):
  """A file of 1 KB whose pickle (deflated) memoizes one object 2**17 times: the scan keeps 8
  bytes per memo entry, as the unpickler does (a dict of int keys took 80: 10 MiB here)."""
  path = _write(tmp_path, 'memo', _deflated_pickle(b'\x80\x04}' + b'\x94' * 2**17 + b'.'))
  assert os.path.getsize(path) < 2**10
  loaded, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert loaded == {} and peak < 3 * 2**20, (loaded, peak)
  # LONG_BINPUT at every index: the same.
  pickled = b'\x80\x02}' + b''.join(b'r' + struct.pack('<I', i) for i in range(2**17)) + b'.'
  path = _write(tmp_path, 'long_binput', _deflated_pickle(pickled))
  loaded, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert loaded == {} and peak < 4 * 2**20, (loaded, peak)


def test_a_pickle_of_many_objects_takes_memory_bounded_by_max_objects(tmp_path, monkeypatch):
  """2**17 empty dicts from a file of 1 KB take what the unpickler makes of them (about 70 bytes
  each: MAX_OBJECTS bounds it), and one more than MAX_OBJECTS is refused before any is made."""
  path = _write(tmp_path, 'objects',
                _deflated_pickle(b'\x80\x02]' + (b'(' + b'}' * 2**14 + b'e') * 8 + b'.'))
  assert os.path.getsize(path) < 2**10
  raised, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert isinstance(raised, pth_files.PthFileError) and 'holds a list' in str(raised), raised
  assert peak < 16 * 2**20, peak
  monkeypatch.setattr(pth_files, 'MAX_OBJECTS', 2**17)
  raised, peak = _traced_peak(lambda: pth_files.read_state_dict(path))
  assert isinstance(raised, pth_files.UnsafePickleError), raised
  assert 'makes more than 131072 objects (MAX_OBJECTS)' in str(raised) and peak < 2**22, peak


def test_tensor_as_storage_through_the_pretrained_loader(tmp_path):
  data, match = _CASES['tensor_as_storage']
  path = _write(tmp_path, 'views_a_tensor', data)
  with pytest.raises(pth_files.UnsafePickleError, match=rf'views_a_tensor\.pth: .*{match}'):
    torchvision.load_state_dict(path)


def test_nesting_far_beyond_the_recursion_limit_is_refused_in_bounded_memory(tmp_path):
  for case in ('nested_tuples_mark', 'nested_tuple1', 'nested_lists', 'nested_dicts'):
    path = _write(tmp_path, case, _CASES[case][0])
    raised, peak = _traced_peak(lambda: pth_files.read_state_dict(path))  # pylint: disable=cell-var-from-loop
    assert isinstance(raised, pth_files.UnsafePickleError) and path in str(raised), raised
    assert peak < 64 * 2**20, (case, peak)


# The mutation fuzzer: byte-, zip- and pickle-level mutations of valid and hostile archives.

_INTERESTING = (0, 1, 2, 7, 16, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1)
_INSERTS = (b'(', b')', b']', b'}', b'N', b'\x88', b't', b'\x85', b'\x86', b'\x87', b'R', b'b',
            b'Q', b'a', b'e', b's', b'u', b'0', b'h\x00', b'h\x05', b'q\x00', b'K\x00', b'K\xff',
            b'J\xff\xff\xff\xff', b'\x8a\x09' + b'\xff' * 9, b'G\x7f\xf8' + b'\x00' * 6,
            b'X\x00\x00\x00\x00', _op_global('os', 'system'),
            _op_global('torch._utils', '_rebuild_tensor_v2'), _op_global('torch', 'DoubleStorage'),
            _op_global('collections', 'OrderedDict'))


def _entries(data: bytes):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      return [
          (info.filename, archive.read(info), info.compress_type) for info in archive.infolist()
      ]


def _mutate_pickle(pickled: bytes, rng: random.Random) -> bytes:
  """An opcode-level change: delete, duplicate, move or insert an opcode, or change an int."""
  ops = [(pos, opcode.name, arg) for opcode, arg, pos in pickletools.genops(pickled)]
  starts = [pos for pos, _, _ in ops] + [len(pickled)]
  i = rng.randrange(len(ops))
  start, end = starts[i], starts[i + 1]
  choice = rng.randrange(5)
  if choice == 0:
    return pickled[:start] + pickled[end:]
  if choice == 1:
    return pickled[:end] + pickled[start:end] + pickled[end:]
  if choice == 2:
    j = rng.randrange(len(ops))
    return pickled[:starts[j]] + pickled[start:end] + pickled[starts[j]:]
  if choice == 3:
    return pickled[:start] + rng.choice(_INSERTS) + pickled[start:]
  ints = [k for k, (_, name, _) in enumerate(ops) if name.startswith(('BININT', 'LONG1'))]
  if not ints:
    return pickled
  k = rng.choice(ints)
  value = rng.choice(_INTERESTING + (-1, -2**31, 2**63, 2**64 + 1, ops[k][2] + 1, ops[k][2] - 1))
  return pickled[:starts[k]] + _op_int(value) + pickled[starts[k + 1]:]


def _mutate_entries(data: bytes, rng: random.Random) -> bytes:
  """A change to the archive's entries, written again with correct CRCs."""
  entries = _entries(data)
  i = rng.randrange(len(entries))
  name, content, method = entries[i]
  choice = rng.randrange(8)
  if choice < 4:
    i = [k for k, entry in enumerate(entries) if entry[0].endswith('data.pkl')][0]
    name, content, method = entries[i]
    entries[i] = (name, _mutate_pickle(content, rng), method)
  elif choice == 3:
    del entries[i]
  elif choice == 4:
    entries.insert(rng.randrange(len(entries) + 1), rng.choice(entries))
  elif choice == 5:
    entries[i] = (name, content,
                  rng.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                              zipfile.ZIP_LZMA)))
  else:
    cut = rng.randrange(len(content) + 1)
    entries[i] = (name, content[:cut] + content[cut:][::-1] * rng.randrange(3), method)
  return _zip(entries)


def _mutate_header(data: bytes, rng: random.Random) -> bytes:
  """A field of a local header, central directory record or end record set to another value."""
  signatures = {
      b'PK\x03\x04': (6, 8, 14, 18, 22, 26, 28),
      b'PK\x01\x02': (8, 10, 16, 20, 24, 28, 30, 42),
      b'PK\x05\x06': (8, 10, 12, 16)
  }
  signature = rng.choice(list(signatures))
  positions = [k for k in range(len(data)) if data.startswith(signature, k)]
  if not positions:
    return data
  position = rng.choice(positions) + rng.choice(signatures[signature])
  out = bytearray(data)
  width = 2 if position + 4 > len(out) or rng.random() < 0.5 else 4
  value = rng.choice(_INTERESTING) % 2**(8 * width)
  if rng.random() < 0.3:
    value = (int.from_bytes(out[position:position + width], 'little') + rng.choice(
        (-1, 1, 8, -8))) % 2**(8 * width)
  out[position:position + width] = value.to_bytes(width, 'little')
  return bytes(out)


def mutate(data: bytes, rng: random.Random, others=()) -> bytes:
  """`data` with one to three random mutations: bit flips, truncation, a splice of another input,
  a pickle opcode, an entry, or a zip header field."""
  for _ in range(rng.choice((1, 1, 1, 2, 3))):
    choice = rng.choice((0, 1, 2, 3, 4, 4, 4, 4))
    try:
      if choice == 0 and data:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
          out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        data = bytes(out)
      elif choice == 1:
        data = data[:rng.randrange(len(data) + 1)]
      elif choice == 2 and others:
        other = rng.choice(others)
        a, b = sorted(rng.randrange(len(other) + 1) for _ in range(2))
        at = rng.randrange(len(data) + 1)
        data = data[:at] + other[a:b] + data[at + rng.randrange(b - a + 1):]
      elif choice == 3:
        data = _mutate_header(data, rng)
      else:
        data = _mutate_entries(data, rng)
    except Exception:  # pylint: disable=broad-except
      pass  # not an archive (any more), or not a pickle: the other mutations still apply
  return data


def storage_bound(data: bytes) -> int:
  """MAX_VIEW_FACTOR times the bytes of the archive's data/ entries, as the zip directory gives
  them: the most that the arrays read from it may take."""
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      sizes = [info.file_size for info in archive.infolist() if '/data/' in info.filename]
  except Exception:  # pylint: disable=broad-except
    return 0
  return pth_files.MAX_VIEW_FACTOR * sum(sizes)


def check_loaded(loaded, data: bytes) -> None:
  """What read_state_dict returned is a dict of str to arrays, within the bound of
  storage_bound, each of whose elements is an element of one of the archive's storages."""
  assert isinstance(loaded, dict) and all(isinstance(name, str) for name in loaded)
  assert all(isinstance(array, np.ndarray) for array in loaded.values())
  total = sum(array.nbytes for array in loaded.values())
  assert total <= storage_bound(data), (total, storage_bound(data))
  if not loaded:
    return
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    contents = [archive.read(info) for info in archive.infolist() if '/data/' in info.filename]
  for name, array in loaded.items():
    if array.size == 0 or array.dtype == np.bool_:
      continue
    words = np.ascontiguousarray(array).view(f'u{array.itemsize}').ravel()
    known = np.concatenate([
        np.frombuffer(content[:len(content) // array.itemsize * array.itemsize],
                      f'{order}u{array.itemsize}').astype(f'u{array.itemsize}')
        for content in contents
        for order in '<>'
    ])
    assert np.isin(words, known).all(), f'{name}: elements not in any storage'


# A PthFileError of read_state_dict's last resort (any other exception, wrapped) is expected
# where a damaged file makes zipfile's parser, or the C unpickler (an unhashable key, a bad
# UTF-8 string), raise; anything else behind it is a bug the checks missed.
_LAST_RESORT = 'cannot be read as a state dict of torch.save ('
_BUGS = (AssertionError, IndexError, RecursionError, SystemError, MemoryError, KeyError,
         AttributeError, NameError)


def hidden_bug(error: pth_files.PthFileError):
  """The exception behind `error` if read_state_dict's last resort wrapped a bug, else None."""
  cause = error.__cause__
  if 'ran out of memory' in str(error):
    return error
  if cause is None or _LAST_RESORT not in str(error):
    return None
  if not isinstance(cause, _BUGS):
    frame = traceback.extract_tb(cause.__traceback__)[-1]
    if os.path.basename(frame.filename) == 'zipfile.py' or '/zipfile/' in frame.filename:
      return None
    if frame.filename == pth_files.__file__ and frame.name == '_read':
      return None
  return cause


def _seeds():
  seeds = list(valid_archives().values())
  seeds += [data for data, _ in _CASES.values() if data.startswith(b'PK') and len(data) < 2**16]
  with open(PTH, 'rb') as f:
    seeds.append(f.read())
  return seeds


def fuzz(seed: int, count: int, crash_dir: str) -> Dict[str, int]:
  """Reads `count` mutated archives; any exception but PthFileError, a hidden_bug, or an output
  that fails check_loaded, writes the input to crash_dir and raises. Returns the outcomes' counts."""
  rng = random.Random(seed)
  seeds = _seeds()
  outcomes = collections.Counter()
  # Each input is written and read again: in memory where /dev/shm is (0.01 ms an open against
  # 0.5 ms on this ext4 disk).
  scratch = tempfile.mkdtemp(dir='/dev/shm' if os.path.isdir('/dev/shm') else crash_dir)
  path = os.path.join(scratch, 'input.pth')
  try:
    _fuzz_loop(rng, seeds, count, path, crash_dir, seed, outcomes)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return outcomes


def _fuzz_loop(rng, seeds, count, path, crash_dir, seed, outcomes):
  """fuzz's inputs, each written to path; a failing one is copied to crash_dir."""
  valid = list(valid_archives().values())
  for n in range(count):
    data = mutate(rng.choice(valid if rng.random() < 0.7 else seeds), rng, seeds)
    with open(path, 'wb') as f:
      f.write(data)
    try:
      loaded = pth_files.read_state_dict(path)
      check_loaded(loaded, data)
      outcomes['read'] += 1
    except pth_files.PthFileError as e:  # counted by the check that refused it
      if hidden_bug(e) is not None:
        shutil.copyfile(path, os.path.join(crash_dir, f'crash_{seed}_{n}.pth'))
        raise AssertionError(f'a bug behind {e}') from hidden_bug(e)
      outcomes[re.sub(r"'[^']*'|\(.*|[0-9]+", '', str(e)[len(path) + 2:])[:40]] += 1
    except BaseException:
      shutil.copyfile(path, os.path.join(crash_dir, f'crash_{seed}_{n}.pth'))
      raise


@pytest.mark.slow
def test_mutated_archives_only_raise_pth_file_errors_in_bounded_memory(tmp_path):
  """A fixed number of seeded mutations, in a child process under an address-space limit (a
  crash fails the test, not pytest): only PthFileError, outputs within the storages' bound."""
  count = 4000  # 5 s on one idle core of a 2-core AMD EPYC, 12 s with both cores busy
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '0',
       str(count), str(tmp_path)],
      capture_output=True,
      text=True,
      timeout=300,
      check=False)
  assert result.returncode == 0, (result.returncode, result.stdout[-2000:], result.stderr[-5000:])
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary['inputs'] == count
  outcomes = summary['outcomes']
  assert sum(outcomes.values()) == count and outcomes.get('read', 0) > count // 20, outcomes
  assert len(outcomes) > 50, outcomes  # the mutations reach many different checks
  assert summary['rss_growth_mib'] < 256, summary


def _fuzz_child(seed: int, count: int, crash_dir: str):
  """The slow test's child: the fuzz loop under RLIMIT_AS, with its peak-RSS growth."""
  pth_files.read_state_dict(PTH)  # everything imported and allocated once before measuring
  start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with open('/proc/self/statm') as f:  # the address space now, plus 1 GiB
    limit = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE') + 2**30
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  outcomes = fuzz(seed, count, crash_dir)
  growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
  print(json.dumps({'inputs': count, 'outcomes': outcomes, 'rss_growth_mib': growth}))


if __name__ == '__main__':
  _fuzz_child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
