"""PyTorch .pth files read without torch (hml_jax/init_from/pth_files.py): tensors come out as torch wrote
them, and a pickle that names any other code is refused without running it."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from hml_jax.init_from import torchvision, pth_files

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
PTH = os.path.join(FIXTURES, 'torchvision_resnet_small.pth')  # tests/fixtures/make_pth_fixture.py
NPZ = os.path.join(FIXTURES, 'torchvision_resnet_small.npz')


def test_torch_saved_fixture_reads_as_the_arrays_it_was_saved_from():
  loaded = pth_files.read_state_dict(PTH)
  with np.load(NPZ) as data:
    expected = {
        name[len('state_dict/'):]: data[name]
        for name in data.files
        if name.startswith('state_dict/')
    }
  assert sorted(loaded) == sorted(expected) and len(loaded) == 104
  for name, array in expected.items():
    assert loaded[name].dtype == array.dtype, name
    np.testing.assert_array_equal(loaded[name], array, err_msg=name)
  assert loaded['layer1.0.conv1.weight'].shape == (8, 8, 1, 1)  # OIHW, as torch keeps it
  assert loaded['bn1.num_batches_tracked'].dtype == np.int64


def _archive(path, pickled: bytes, storages=None, prefix='archive'):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(f'{prefix}/data.pkl', pickled)
    archive.writestr(f'{prefix}/byteorder', 'little')
    for key, data in (storages or {}).items():
      archive.writestr(f'{prefix}/data/{key}', data)
  return str(path)


class _RunsCode:
  """Unpickling this calls os.system: what a malicious weights file does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Evaluates:

  def __reduce__(self):
    return (eval, ("__import__('os').mkdir('should_not_exist')",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / 'ran'
  payload = pickle.dumps({'conv1.weight': _RunsCode(f'touch {marker}')}, protocol=2)
  path = _archive(tmp_path / 'evil.pth', payload)
  with pytest.raises(pth_files.UnsafePickleError,
                     match=r'evil\.pth: refused to load (posix|os)\.system'):
    pth_files.read_state_dict(path)
  assert not marker.exists()
  # The same through the loader that config.init_from uses.
  with pytest.raises(pth_files.UnsafePickleError, match='only hold tensors'):
    torchvision.load_state_dict(path)
  assert not marker.exists()

  path = _archive(tmp_path / 'evil2.pth', pickle.dumps(_Evaluates(), protocol=4))
  with pytest.raises(pth_files.UnsafePickleError, match=r'builtins\.eval'):
    pth_files.read_state_dict(path)
  assert not (tmp_path / 'should_not_exist').exists() and not os.path.exists('should_not_exist')


def test_a_persistent_id_that_is_not_a_storage_is_refused(tmp_path):
  buffer = io.BytesIO()

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      return ('module', 'os') if obj == 'x' else None

  Pickler(buffer, protocol=2).dump({'a': 'x'})
  path = _archive(tmp_path / 'odd.pth', buffer.getvalue())
  with pytest.raises(pth_files.UnsafePickleError, match='unexpected persistent id'):
    pth_files.read_state_dict(path)


def test_files_that_are_not_torch_archives(tmp_path):
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(pickle.dumps({'a': 1}))
  with pytest.raises(ValueError, match=r'legacy\.pth: not a zip archive.*convert'):
    pth_files.read_state_dict(str(legacy))
  other = tmp_path / 'other.pth'
  with zipfile.ZipFile(other, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  with pytest.raises(ValueError, match=r'other\.pth: not a torch\.save archive'):
    pth_files.read_state_dict(str(other))
  not_a_dict = _archive(tmp_path / 'list.pth', pickle.dumps([1, 2], protocol=2))
  with pytest.raises(ValueError, match='holds a list, not a state dict'):
    pth_files.read_state_dict(not_a_dict)


def test_a_storage_shorter_than_its_tensor_is_an_error(tmp_path):
  pickled = (b'\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02('
             b'(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05'
             b'X\x03\x00\x00\x00cpuq\x06K\x04tq\x07QK\x00K\x03K\x02\x86q\x08K\x02K\x01\x86q\t'
             b'\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.')
  good = _archive(tmp_path / 'good.pth', pickled, {'0': np.arange(6, dtype='<f4').tobytes()})
  with pytest.raises(pth_files.PthFileError, match='holds 24 bytes, not 4 elements'):
    pth_files.read_state_dict(good)
  pickled = pickled.replace(b'K\x04tq\x07', b'K\x06tq\x07')
  good = _archive(tmp_path / 'good6.pth', pickled, {'0': np.arange(6, dtype='<f4').tobytes()})
  np.testing.assert_array_equal(
      pth_files.read_state_dict(good)['w'],
      np.arange(6, dtype=np.float32).reshape(3, 2))
  pickled = pickled.replace(b'K\x03K\x02\x86q\x08', b'K\x04K\x02\x86q\x08')
  short = _archive(tmp_path / 'short.pth', pickled, {'0': np.arange(6, dtype='<f4').tobytes()})
  with pytest.raises(pth_files.PthFileError, match='reaches element 7 of a storage of 6'):
    pth_files.read_state_dict(short)


def test_same_arrays_as_torch_load_weights_only(tmp_path):
  torch = pytest.importorskip('torch')
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=generator)
  state = {
      'float32': torch.randn(4, 3, 3, 3, generator=generator),
      'float16': torch.randn(7, generator=generator).half(),
      'bfloat16': torch.randn(2, 3, generator=generator).bfloat16(),
      'float64': torch.randn(3, generator=generator).double(),
      'int64': torch.arange(5),
      'bool': torch.tensor([True, False, True]),
      'scalar': torch.tensor(3.5),
      'empty': torch.zeros(0, 4),
      'transposed': base.t(),  # non-contiguous strides
      'rows_2_to_4': base[2:5],  # a view at an offset into a shared storage
      'every_other': base[:, ::2],
  }
  path = tmp_path / 'mixed.pth'
  torch.save(state, path)
  ours = pth_files.read_state_dict(str(path))
  theirs = torch.load(path, map_location='cpu', weights_only=True)
  assert sorted(ours) == sorted(theirs)
  for name, tensor in theirs.items():
    expected = (tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy())
    actual = ours[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[name]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    np.testing.assert_array_equal(actual, expected, err_msg=name)
  # And the committed fixture, saved as torchvision's files are.
  theirs = torch.load(PTH, map_location='cpu', weights_only=True)
  ours = pth_files.read_state_dict(PTH)
  assert sorted(ours) == sorted(theirs)
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_real_torchvision_weights_when_present():
  """Where a torchvision ImageNet file is in a cache (never downloaded by the tests), the
  restricted reader gives exactly torch.load(weights_only=True)'s arrays."""
  torch = pytest.importorskip('torch')
  candidates = [
      os.path.join(place, weights.filename)
      for weights in torchvision.IMAGENET_WEIGHTS.values()
      for place in (os.environ.get('HML_JAX_CACHE', os.path.expanduser('~/.cache/hml_jax')),
                    torchvision.torch_hub_checkpoints())
  ]
  present = [path for path in candidates if os.path.isfile(path)]
  if not present:
    pytest.skip('no torchvision ImageNet weights file in the caches')
  path = present[0]
  ours = pth_files.read_state_dict(path)
  theirs = torch.load(path, map_location='cpu', weights_only=True)
  assert sorted(ours) == sorted(theirs)
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)


def test_a_pickle_cannot_change_the_stand_ins_for_later_loads(tmp_path):
  """BUILD on an allowed name (here torch.FloatStorage with state (None, {'dtype': 'x'})) must
  neither succeed nor leave anything behind for the next file."""
  pickled = (b'\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00xs\x86b.')
  path = _archive(tmp_path / 'mutating.pth', pickled)
  with pytest.raises(pth_files.UnsafePickleError,
                     match=r'mutating\.pth: its pickle applies BUILD .* to torch\.FloatStorage'):
    pth_files.read_state_dict(path)
  assert len(pth_files.read_state_dict(PTH)) == 104
  # The scan refuses it before unpickling; the stand-in itself is immutable too.
  with zipfile.ZipFile(path) as archive:
    loader = pth_files._Loader(archive, {}, 'archive', 'little', path)  # pylint: disable=protected-access
    with pytest.raises(pth_files.UnsafePickleError, match="tried to set 'dtype'"):
      pth_files._StateDictUnpickler(io.BytesIO(pickled), loader).load()  # pylint: disable=protected-access


def test_a_tensor_asking_for_huge_memory_is_refused(tmp_path):
  """Zero strides over a one-element storage could ask for any size; it is refused before any
  memory is taken: beyond MAX_BYTES, and beyond MAX_VIEW_FACTOR times the storages."""
  pickled = (b'\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02('
             b'(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05'
             b'X\x03\x00\x00\x00cpuq\x06K\x01tq\x07QK\x00J\x00\x00\x10\x00J\x00\x00\x10\x00'
             b'\x86q\x08K\x00K\x00\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.')
  path = _archive(tmp_path / 'huge.pth', pickled, {'0': np.ones(1, '<f4').tobytes()})
  with pytest.raises(pth_files.PthFileError,
                     match=r'huge\.pth: a tensor of size \(1048576, '
                     r'1048576\), stride \(0, 0\).*more than MAX_BYTES=17179869184 bytes'):
    pth_files.read_state_dict(path)
  # 2**14 x 2**13 float32 (512 MiB) from 4 bytes: within MAX_BYTES, not within 4x the storage.
  pickled = pickled.replace(b'J\x00\x00\x10\x00J\x00\x00\x10\x00',
                            b'J\x00\x40\x00\x00J\x00\x20\x00\x00')
  path = _archive(tmp_path / 'zeros.pth', pickled, {'0': np.ones(1, '<f4').tobytes()})
  with pytest.raises(pth_files.PthFileError,
                     match=r'zeros\.pth: its tensors would take 536870912 bytes .* more than 4x '
                     'the 4 bytes of the storages they view'):
    pth_files.read_state_dict(path)
  # Two views of one storage (tied weights) are within the bound, and equal.
  pickled = (b'\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02('
             b'(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05'
             b'X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00K\x03K\x02\x86q\x08K\x02K\x01\x86q\t'
             b'\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rX\x01\x00\x00\x00vh\ru.')
  path = _archive(tmp_path / 'tied.pth', pickled, {'0': np.arange(6, dtype='<f4').tobytes()})
  loaded = pth_files.read_state_dict(path)
  np.testing.assert_array_equal(loaded['w'], np.arange(6, dtype=np.float32).reshape(3, 2))
  np.testing.assert_array_equal(loaded['v'], loaded['w'])
