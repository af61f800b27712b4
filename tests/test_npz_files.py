"""A user's .npz read without pickles and in memory bounded by the file (hml_jax/data/npz_files.py):
honest files read as np.load reads them, hostile ones are refused before any array is made."""
import io
import pickle
import resource
import zipfile

import numpy as np
import pytest

from hml_jax.data import npz_files
from hml_jax.init_from import torchvision
from hml_jax.runtime import errors


def npy_bytes(array, shape=None):
  """array as an .npy file whose header may declare another shape."""
  buffer = io.BytesIO()
  header = {
      'descr': np.lib.format.dtype_to_descr(array.dtype),
      'fortran_order': False,
      'shape': tuple(array.shape if shape is None else shape)
  }
  np.lib.format.write_array_header_1_0(buffer, header)
  buffer.write(array.tobytes())
  return buffer.getvalue()


def npz_of(path, members, compression=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, 'w', compression) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return str(path)


@pytest.mark.parametrize('save', [np.savez, np.savez_compressed])
def test_an_honest_file_reads_as_numpy_reads_it(tmp_path, save):
  arrays = {
      'train_features': np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32),
      'train_labels': (np.arange(50 * 3).reshape(50, 3) % 7 == 0).astype(np.uint8),
      'label_names': np.array(['cat', 'dog', 'émeu']),
      'scalar': np.float64(3.5),
      'fortran': np.asfortranarray(np.arange(12.).reshape(3, 4)),
  }
  save(tmp_path / 'f.npz', **arrays)
  read = npz_files.read_arrays(str(tmp_path / 'f.npz'))
  with np.load(tmp_path / 'f.npz') as reference:
    assert list(read) == reference.files
    for key in reference.files:
      np.testing.assert_array_equal(read[key], reference[key])
      assert read[key].dtype == reference[key].dtype


def test_a_header_declaring_more_than_the_member_holds_is_refused_before_allocating(tmp_path):
  # 4 bytes of data under a header of a 10^6 x 10^6 float32 array (4 TB): numpy alone would
  # allocate it before reading.
  path = npz_of(tmp_path / 'huge.npz',
                {'w.npy': npy_bytes(np.ones(1, np.float32), shape=(10**6, 10**6))})
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with pytest.raises(errors.InvalidInputError,
                     match=r"huge\.npz: key 'w' declares a 1000000x1000000 float32 array "
                     r'\(4000000000000 bytes\), but its member holds 4'):
    npz_files.read_arrays(path)
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
  # Fewer bytes declared than held is refused too (the member is not what numpy wrote).
  path = npz_of(tmp_path / 'short.npz', {'w.npy': npy_bytes(np.ones(8, np.float32), shape=(2,))})
  with pytest.raises(errors.InvalidInputError, match="key 'w' declares a 2 float32 array"):
    npz_files.read_arrays(path)


def test_a_decompression_bomb_is_refused_from_the_directory(tmp_path, monkeypatch):
  # 64 MiB of zeros deflate to about 64 KB (1000x); the bound scaled down to show it.
  path = npz_of(tmp_path / 'bomb.npz', {'w.npy': npy_bytes(np.zeros(2**24, np.float32))},
                zipfile.ZIP_DEFLATED)
  monkeypatch.setattr(npz_files, 'EXPANSION_ALLOWANCE', 2**20)
  with pytest.raises(errors.InvalidInputError,
                     match=r'bomb\.npz declares 67,108,992 bytes of arrays in a file of [0-9,]+: '
                     r'more than 32x its size plus 1,048,576 bytes, which only a decompression '
                     'bomb needs'):
    npz_files.read_arrays(path)
  # The same file within the bound (the default allowance of a GiB) reads.
  monkeypatch.undo()
  assert npz_files.read_arrays(path)['w'].shape == (2**24,)


class _RunsCode:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_an_object_array_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / 'marker'
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {
      'descr': '|O',
      'fortran_order': False,
      'shape': (1,)
  })
  buffer.write(pickle.dumps(np.array([_RunsCode(str(marker))], dtype=object)))
  path = npz_of(tmp_path / 'planted.npz', {'label_names.npy': buffer.getvalue()})
  with pytest.raises(errors.InvalidInputError,
                     match=r"planted\.npz: key 'label_names' cannot be read: it is an object "
                     'array, which only unpickling could read'):
    npz_files.read_arrays(path)
  assert not marker.exists()


@pytest.mark.parametrize('damage, expected', [
    ('truncated', 'is truncated or not an .npz file'),
    ('npy', 'is a single .npy array, not an .npz'),
    ('text', 'is truncated or not an .npz file'),
    ('crc', "key 'w' cannot be read (BadZipFile"),
    ('not_npy', "member 'notes.txt' is not an .npy array"),
    ('bzip2', "member 'w.npy' is encrypted or compressed otherwise than numpy does (method 12)"),
    ('encrypted', "member 'w.npy' is encrypted"),
    ('duplicate', 'lists a member twice'),
    ('bad_header', "key 'w' is not an .npy array"),
])
def test_damaged_and_foreign_files_are_named(tmp_path, damage, expected):
  path = tmp_path / 'f.npz'
  if damage in ('truncated', 'crc', 'encrypted'):
    np.savez(path, w=np.arange(1000, dtype=np.float32))
    data = bytearray(path.read_bytes())
    if damage == 'truncated':
      data = data[:len(data) // 2]
    elif damage == 'crc':
      data[len(data) // 3] ^= 0x01  # inside w's stored bytes
    else:
      data[6] |= 0x01  # the local header's flags, and the central directory's
      central = data.rfind(b'PK\x01\x02')
      data[central + 8] |= 0x01
    path.write_bytes(bytes(data))
  elif damage == 'npy':
    np.save(tmp_path / 'f.npy', np.zeros(3))
    path.write_bytes((tmp_path / 'f.npy').read_bytes())
  elif damage == 'text':
    path.write_text('train_features,1,2,3\n')
  elif damage == 'not_npy':
    npz_of(path, {'w.npy': npy_bytes(np.zeros(2)), 'notes.txt': b'hello'})
  elif damage == 'bzip2':
    npz_of(path, {'w.npy': npy_bytes(np.zeros(2))}, zipfile.ZIP_BZIP2)
  elif damage == 'duplicate':
    with pytest.warns(UserWarning, match='Duplicate name'):
      npz_of(path, {'w.npy': npy_bytes(np.zeros(2))})
      with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('w.npy', npy_bytes(np.ones(2)))
  else:
    npz_of(path, {'w.npy': b'\x93NUMPY\x07\x00garbage'})
  with pytest.raises(errors.InvalidInputError) as error:
    npz_files.read_arrays(str(path))
  assert str(error.value).startswith(str(path)) and expected in str(error.value), error.value


def test_weights_files_other_than_pth_are_checked_too(tmp_path):
  """pretrained.load_state_dict's .npz and .safetensors: hostile or damaged is one user error."""
  path = npz_of(tmp_path / 'w.npz', {'fc.weight.npy': npy_bytes(np.ones(1), shape=(10**9,))})
  with pytest.raises(errors.InvalidInputError, match=r"w\.npz: key 'fc\.weight' declares"):
    torchvision.load_state_dict(path)
  path = tmp_path / 'w.safetensors'
  path.write_bytes(b'\xff' * 8 + b'{}')  # a header length far beyond the file
  with pytest.raises(errors.InvalidInputError,
                     match=r'w\.safetensors is not a readable \.safetensors file'):
    torchvision.load_state_dict(str(path))
