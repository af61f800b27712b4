"""Data files made to hurt: pickles that run code, paths that leak or leave the folder,
decompression bombs, values that overflow float32, truncated archives.

Each test plants the file and checks what the user sees (an error naming the file, line or key)
against an independent reference: the file's bytes as written, PIL's own reading of a header,
float32's range, a marker file that code run by a pickle would create.
"""
import ast
import io
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import time
import zlib

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import ml_collections
import numpy as np
from PIL import Image
import pytest

from hml_jax.data import decoders
from hml_jax.datasets import features
from hml_jax.datasets import folder
from hml_jax.datasets import nus_wide
from hml_jax.runtime import errors
from hml_jax.tools import predict
from hml_jax.training import input_pipeline
from tests import dataset_fixtures
from tests import test_folder_and_features as folder_tests

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'hml_jax'


class _RunsCode:
  """Unpickled, it runs a shell command (what a planted data file does)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _npy_header(descr='|O', shape=(2,)) -> bytes:
  """The header np.save writes for an array of this descr and shape (format 1.0)."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {
      'descr': descr,
      'fortran_order': False,
      'shape': shape
  })
  return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# 1. No data file is unpickled.


@pytest.mark.parametrize('planted', ['bare_pickle_labels', 'npy_header_pickle_images'])
def test_a_planted_nus_wide_pickle_is_refused_and_runs_nothing(tmp_path, planted):
  dataset_fixtures.write_nus_wide(str(tmp_path))
  marker = tmp_path / 'marker'
  payload = pickle.dumps(_RunsCode(f'touch {marker}'))
  if planted == 'bare_pickle_labels':  # what circulated: a pickle named like the labels file
    path = tmp_path / 'formatted_train_labels.npy'
    path.write_bytes(payload)
    expected = 'it is not an .npy file'
  else:  # an .npy whose header says object array, and whose payload runs code
    path = tmp_path / 'formatted_train_images.npy'
    path.write_bytes(_npy_header() + payload)
    expected = f'its pickle names {os.system.__module__}.system'
  with pytest.raises(nus_wide.UnsafeNpyError) as error:
    nus_wide.read_split(tmp_path, 'train')
  message = str(error.value)
  assert message.startswith(f'{path}: refused to read it')
  assert expected in message and 'do not load it with allow_pickle=True' in message
  assert isinstance(error.value, errors.UserError)
  assert not marker.exists()


@pytest.mark.slow
def test_the_planted_pickle_does_run_code_when_unpickled(tmp_path):
  """The reference for the test above: the payload, unpickled as np.load(allow_pickle=True)
  would, creates the marker (in a child process, so that nothing here is touched)."""
  marker = tmp_path / 'marker'
  subprocess.run([sys.executable, '-c', 'import pickle,sys; pickle.loads(sys.stdin.buffer.read())'],
                 input=pickle.dumps(_RunsCode(f'touch {marker}')),
                 check=True)
  assert marker.exists()


@pytest.mark.parametrize('protocol', [2, 3])
@pytest.mark.parametrize('numpy_module', ['numpy._core.multiarray', 'numpy.core.multiarray'])
def test_cole_et_al_object_array_of_paths_is_read_without_unpickling(tmp_path, numpy_module,
                                                                     protocol):
  """Their images file is an object array of str: read by the restricted reader, equal to the
  paths written; numpy 1.x's module name (numpy.core) and pickle protocols 2 (numpy < 1.17) and
  3 (numpy 1.x's np.save) too."""
  written = dataset_fixtures.write_nus_wide(str(tmp_path))
  paths = written['paths']['train']
  # Protocols 2 and 3 name globals as text lines, so numpy 1.x's name can be written here.
  payload = pickle.dumps(np.array(paths, dtype=object), protocol=protocol)
  payload = payload.replace(b'cnumpy._core.multiarray\n', f'c{numpy_module}\n'.encode())
  (tmp_path / 'formatted_train_images.npy').write_bytes(_npy_header(shape=(len(paths),)) + payload)
  filenames, labels, _ = nus_wide.read_split(tmp_path, 'train')
  assert filenames == paths
  np.testing.assert_array_equal(labels, written['labels']['train'])
  # np.save's own object arrays (protocol 3 or 4), read back the same.
  np.save(tmp_path / 'formatted_train_images.npy', np.array(paths, dtype=object))
  assert nus_wide.read_split(tmp_path, 'train')[0] == paths


_GOOD_PICKLE = pickle.dumps(np.array(['a', 'b'], dtype=object), protocol=2)
MISUSED_PICKLES = {
    'int elements':
        pickle.dumps(np.array([1, 2], dtype=object), protocol=2),
    'numpy str_ elements':
        pickle.dumps(np.array([np.str_('a'), 'b'], dtype=object), protocol=2),
    'a float dtype':
        _GOOD_PICKLE.replace(b'X\x02\x00\x00\x00O8', b'X\x02\x00\x00\x00f8'),
    'a 2-D shape':
        pickle.dumps(np.array([['a'], ['b']], dtype=object), protocol=2),
    'BUILD on a stand-in':
        b'\x80\x02cnumpy\ndtype\n}X\x08\x00\x00\x00__call__K\x01sb.',
    'other bytes for _reconstruct':
        _GOOD_PICKLE.replace(b'X\x01\x00\x00\x00b', b'X\x01\x00\x00\x00c'),
}


@pytest.mark.parametrize('case', sorted(MISUSED_PICKLES))
def test_a_pickle_of_the_allowed_names_with_other_arguments_is_refused(tmp_path, case):
  """The names of an object array's pickle, misused: other dtypes, shapes, elements, arguments,
  BUILD on the stand-ins. Each is refused; none builds a numpy object."""
  payload = MISUSED_PICKLES[case]
  assert payload != _GOOD_PICKLE
  path = tmp_path / 'formatted_train_images.npy'
  path.write_bytes(_npy_header() + payload)
  with pytest.raises(nus_wide.UnsafeNpyError, match=re.escape(f'{path}: refused')):
    nus_wide.load_npy(str(path), strings=True)


@pytest.mark.slow
def test_the_conversion_command_of_the_refusal_makes_a_file_that_loads(tmp_path):
  """Elements that are numpy.str_ (an honest file the reader does not admit): the refusal gives
  a command; run as the user would, it writes a unicode array that loads without pickle."""
  path = tmp_path / 'formatted_train_images.npy'
  np.save(path, np.array([np.str_('actor/1.jpg'), 'zebra/2.jpg'], dtype=object))
  with pytest.raises(nus_wide.UnsafeNpyError) as error:
    nus_wide.load_npy(str(path), strings=True)
  command = re.search(r'python -c "(.*)"', str(error.value)).group(1)
  subprocess.run([sys.executable, '-c', command], check=True)
  assert np.load(path, allow_pickle=False).tolist() == ['actor/1.jpg', 'zebra/2.jpg']
  assert nus_wide.load_npy(str(path), strings=True).tolist() == ['actor/1.jpg', 'zebra/2.jpg']


def test_object_labels_and_truncated_npy_name_the_file(tmp_path):
  labels = tmp_path / 'labels.npy'
  np.save(labels, np.array([[0, 1]], dtype=object))
  with pytest.raises(nus_wide.UnsafeNpyError, match=re.escape(f'{labels}: refused')):
    nus_wide.load_npy(str(labels))
  truncated = tmp_path / 'truncated.npy'
  np.save(truncated, np.zeros((100, 81)))
  truncated.write_bytes(truncated.read_bytes()[:1000])
  with pytest.raises(errors.InvalidInputError,
                     match=re.escape(f'{truncated} declares a (100, 81) float64 array (64,800 '
                                     'bytes) but holds 872 bytes of data: it is truncated')):
    nus_wide.load_npy(str(truncated))
  # A header asking for 40 GB over 4 bytes: refused before numpy would allocate it.
  huge = tmp_path / 'huge.npy'
  with open(huge, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, {
        'descr': '<f4',
        'fortran_order': False,
        'shape': (10**5, 10**5)
    })
    f.write(bytes(4))
  with pytest.raises(errors.InvalidInputError, match=r'\(100000, 100000\) float32 array'):
    nus_wide.load_npy(str(huge))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_mutated_pickles_are_read_as_strings_or_refused(data):
  """Random byte changes to an object array's pickle: either the strings come back as a unicode
  array, or UnsafeNpyError; never another exception, never another type."""
  payload = bytearray(pickle.dumps(np.array(['a/1.jpg', 'b'], dtype=object), protocol=2))
  for _ in range(data.draw(st.integers(1, 4))):
    payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
  try:
    array = nus_wide.read_object_strings('x.npy', io.BytesIO(bytes(payload)))
  except nus_wide.UnsafeNpyError:
    return
  assert array.dtype.kind == 'U' and array.ndim == 1


def _calls(tree, module, attribute):
  return [
      node for node in ast.walk(tree)
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr ==
      attribute and isinstance(node.func.value, ast.Name) and node.func.value.id == module
  ]


def test_the_package_loads_no_array_or_pickle_unrestricted():
  """Every np.load in hml_jax passes allow_pickle=False; nothing calls pickle.load(s); every
  Unpickler subclass restricts find_class."""
  for source in PACKAGE.rglob('*.py'):
    tree = ast.parse(source.read_text())
    for call in _calls(tree, 'np', 'load'):
      keywords = {k.arg: k.value for k in call.keywords}
      assert 'allow_pickle' in keywords, f'{source}:{call.lineno}'
      assert isinstance(keywords['allow_pickle'], ast.Constant), f'{source}:{call.lineno}'
      assert keywords['allow_pickle'].value is False, f'{source}:{call.lineno}'
    for name in ('load', 'loads'):
      assert not _calls(tree, 'pickle', name), f'{source}: pickle.{name}'
    for node in ast.walk(tree):
      if isinstance(node, ast.ClassDef) and any(
          isinstance(b, ast.Attribute) and b.attr == 'Unpickler' for b in node.bases):
        methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
        assert 'find_class' in methods, f'{source}: {node.name}'


# ------------------------------------------------------------------------------------------------
# 2. Folder datasets: paths compared as files.


def _rows(root, name):
  return (root / name).read_text().rstrip('\n').split('\n')


def _load(root, **dataset):
  config = folder_tests.tiny_image_config(root)
  for key, value in dataset.items():
    config.dataset[key] = value
  return input_pipeline.load(config)


@pytest.mark.parametrize('spelling', ['./{}', 'images/../{}', 'alias'])
def test_one_image_in_train_and_test_under_another_spelling_is_refused(tmp_path, spelling):
  folder_tests.write_folder(tmp_path)
  train_row = _rows(tmp_path, 'train.csv')[1]
  filename = train_row.split(',')[0]
  if spelling == 'alias':  # a symbolic link to the same file
    os.symlink(tmp_path / filename, tmp_path / 'images' / 'alias.jpg')
    other = 'images/alias.jpg'
  else:
    other = spelling.format(filename)
  assert os.path.samefile(tmp_path / other, tmp_path / filename)  # the reference
  test_rows = _rows(tmp_path, 'test.csv') + [f'{other},cat']
  (tmp_path / 'test.csv').write_text('\n'.join(test_rows) + '\n')
  with pytest.raises(errors.InvalidInputError) as error:
    _load(tmp_path)
  message = str(error.value)
  assert 'in both' in message and str(tmp_path / 'test.csv') in message
  assert f'{filename} (line 2) and {other} (line {len(test_rows)})' in message


def test_one_image_twice_in_a_csv_under_another_spelling_is_refused(tmp_path):
  folder_tests.write_folder(tmp_path)
  rows = _rows(tmp_path, 'train.csv')
  filename = rows[1].split(',')[0]
  rows.append(f'./{filename},dog')
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  with pytest.raises(errors.InvalidInputError,
                     match=re.escape(f'lists ./{filename} twice (lines 2 and {len(rows)})')):
    _load(tmp_path)


@pytest.mark.parametrize('outside', ['relative', 'absolute'])
def test_a_path_outside_the_folder_is_refused_unless_allowed(tmp_path, outside):
  root = tmp_path / 'data'
  folder_tests.write_folder(root)
  image = tmp_path / 'elsewhere.png'
  Image.fromarray(np.full((24, 24, 3), 7, np.uint8)).save(image)
  filename = '../elsewhere.png' if outside == 'relative' else str(image)
  rows = _rows(root, 'train.csv') + [f'{filename},cat']
  (root / 'train.csv').write_text('\n'.join(rows) + '\n')
  with pytest.raises(errors.InvalidInputError) as error:
    _load(root)
  assert str(error.value).startswith(f'{root / "train.csv"} line {len(rows)}: {filename} is '
                                     'outside the dataset folder')
  assert 'allow_outside_paths=True' in str(error.value)
  data = _load(root, allow_outside_paths=True)
  assert len(data.train) + len(data.validation) == len(rows) - 1


def test_a_symlinked_folder_and_symlinked_images_inside_it_are_inside(tmp_path):
  real = tmp_path / 'real'
  folder_tests.write_folder(real)
  outside = tmp_path / 'shared_images'
  outside.mkdir()
  os.replace(real / 'images' / 'train_0.jpg', outside / 'train_0.jpg')
  os.symlink(outside / 'train_0.jpg', real / 'images' / 'train_0.jpg')
  os.symlink(real, tmp_path / 'link')
  data = _load(tmp_path / 'link')
  assert len(data.train) + len(data.validation) == 24 and len(data.test) == 8


def test_a_csv_that_is_not_utf8_names_the_file_and_line(tmp_path):
  folder_tests.write_folder(tmp_path)
  rows = _rows(tmp_path, 'train.csv')
  rows[3] = rows[3].split(',')[0] + ',caf\xe9'
  (tmp_path / 'train.csv').write_bytes(('\n'.join(rows) + '\n').encode('latin-1'))
  with pytest.raises(errors.InvalidInputError) as error:
    _load(tmp_path)
  column = len(rows[3].encode('latin-1')) - 1 + 1
  assert str(error.value).startswith(f'{tmp_path / "train.csv"} line 4 is not UTF-8 (byte 0xe9 '
                                     f'at column {column})')
  assert 'save the CSV as UTF-8' in str(error.value)


def test_a_nul_character_in_a_filename_names_the_line(tmp_path):
  folder_tests.write_folder(tmp_path)
  rows = _rows(tmp_path, 'train.csv')
  rows[2] = 'images/tr\0ain_1.jpg,cat'
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  with pytest.raises(errors.InvalidInputError, match='train.csv line 3 has a NUL character'):
    _load(tmp_path)


# ------------------------------------------------------------------------------------------------
# 3. Decompression bombs.


def _png(width, height, rows: bytes) -> bytes:
  """A 1-bit grayscale PNG declaring width x height whose IDAT is zlib(rows)."""

  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I',
                        zlib.crc32(kind + body) & 0xffffffff))

  header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows, 9)) +
          chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def bomb():
  """A real 13000 x 10000 PNG (130 million pixels, all black) of about 16 KB: PIL only warns."""
  width, height = 13000, 10000
  return _png(width, height, bytes((width + 7) // 8 + 1) * height)


@pytest.fixture(autouse=True)
def _pil_limit(monkeypatch):
  """Whatever a test raises PIL's own limit to is undone after it."""
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_the_bomb_is_one_pil_would_decode(bomb):
  """The reference: PIL reads the declared size from the header and only warns (its error is at
  twice its limit); the file is small."""
  assert len(bomb) < 20_000
  assert Image.MAX_IMAGE_PIXELS == decoders.DEFAULT_MAX_IMAGE_PIXELS
  with pytest.warns(Image.DecompressionBombWarning):
    with Image.open(io.BytesIO(bomb)) as image:
      assert image.size == (13000, 10000)


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_every_decode_refuses_the_bomb_from_its_header_in_milliseconds(bomb, tmp_path):
  expected = ('is 13000x10000 = 130,000,000 pixels, more than '
              'config.dataset.max_image_pixels=89,478,485')
  path = tmp_path / 'bomb.png'
  path.write_bytes(bomb)
  checks = {
      'decode':
          lambda: decoders.decode_and_resize_with_pil(bomb, 32),
      'batch':
          lambda: decoders.decode_batch_with_pil(np.array([bomb], object), np.array([False]),
                                                 np.array([7]), 32),
      'predict_pil':
          lambda: predict.load_image(str(path), 32, 3, 'pil'),
      'predict_tensorflow':
          lambda: predict.load_image(str(path), 32, 3, 'tensorflow'),
      'folder_check':
          lambda: folder.check_image(str(path), 'pil'),
  }
  for name, check in checks.items():
    start = time.perf_counter()
    try:
      outcome = check()
    except ValueError as error:
      outcome = str(error)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, (name, elapsed)  # a decode takes seconds
    message = outcome[1] if isinstance(outcome, tuple) else outcome
    assert expected in message, name
    assert '--config.dataset.max_image_pixels=130000000' in message, name
  with pytest.raises(decoders.ImageTooLargeError, match='^the image is 13000x10000'):
    decoders.decode_and_resize_with_pil(bomb, 32)
  with pytest.raises(ValueError, match='^Image of row 7 of this split: the image is 13000x10000'):
    checks['batch']()


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_the_folder_check_names_the_bomb_or_skips_it(bomb, tmp_path):
  folder_tests.write_folder(tmp_path)
  (tmp_path / 'images' / 'bomb.png').write_bytes(bomb)
  rows = _rows(tmp_path, 'train.csv') + ['images/bomb.png,cat']
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  start = time.perf_counter()
  with pytest.raises(errors.InvalidInputError) as error:
    _load(tmp_path)
  assert time.perf_counter() - start < 10  # the 32 images' check, not a 2.4 s decode
  assert (f'{tmp_path / "images" / "bomb.png"}: is 13000x10000 = 130,000,000 pixels, more than '
          'config.dataset.max_image_pixels=89,478,485') in str(error.value)
  data = _load(tmp_path, skip_corrupt=True)
  assert len(data.train) + len(data.validation) == 24


def test_the_limit_is_the_key_and_beyond_pils_own(tmp_path):
  """The key moves the limit both ways: a 20 x 20 image is refused at 399 pixels and read at 400;
  a header of 200 million pixels (beyond PIL's own error at twice its limit) is named with its
  count, and admitted (header only) when the key allows it."""
  image = Image.fromarray(np.full((20, 20, 3), 9, np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  small = buffer.getvalue()
  with pytest.raises(decoders.ImageTooLargeError, match='= 400 pixels, more than .*=399'):
    decoders.decode_and_resize_with_pil(small, 8, max_pixels=399)
  np.testing.assert_array_equal(decoders.decode_and_resize_with_pil(small, 8, max_pixels=400),
                                np.full((8, 8, 3), 9, np.uint8))
  huge = _png(20000, 10000, b'\0' * 100)  # its IDAT is short: only the header is ever read
  with pytest.raises(Image.DecompressionBombError):
    Image.open(io.BytesIO(huge))  # the reference: PIL refuses it itself
  with pytest.raises(decoders.ImageTooLargeError, match=r'is 200,000,000 pixels, more than'):
    decoders.open_image(io.BytesIO(huge))
  with decoders.open_image(io.BytesIO(huge), max_pixels=200_000_000) as opened:
    assert opened.size == (20000, 10000)
  for value in (0, -5, 1.5, True):
    with pytest.raises(errors.InvalidInputError, match='config.dataset.max_image_pixels='):
      decoders.max_image_pixels(ml_collections.ConfigDict({'max_image_pixels': value}))


# ------------------------------------------------------------------------------------------------
# 4. Features files.


def _features(tmp_path, **changes):
  path = tmp_path / 'f.npz'
  arrays = folder_tests.write_features(path, num_train=40, num_test=20)
  arrays.update(changes)
  np.savez(path, **arrays)
  return path, arrays


def test_a_value_float32_cannot_hold_is_refused_after_the_cast(tmp_path):
  path = tmp_path / 'f.npz'
  arrays = folder_tests.write_features(path, num_train=40, num_test=20)
  big = arrays['train_features'].astype(np.float64)
  big[5, 2] = 1e300
  with np.errstate(over='ignore'):  # the reference: float32 holds it as inf
    assert np.isfinite(big).all() and np.isinf(big.astype(np.float32)[5, 2])
  np.savez(path, **dict(arrays, train_features=big))
  with pytest.raises(errors.InvalidInputError) as error:
    features.load_source(ml_collections.ConfigDict({'path': str(path)}))
  assert str(error.value).startswith(
      f"{path}: 'train_features' has a non-finite value in row 5, column 2: 1e+300, which "
      'float32')


@pytest.mark.parametrize('damage', ['truncated', 'crc', 'npy', 'pickle'])
def test_a_damaged_npz_names_the_file(tmp_path, damage):
  path, arrays = _features(tmp_path)
  data = path.read_bytes()
  expected = [str(path)]
  if damage == 'truncated':
    path.write_bytes(data[:len(data) // 2])
    expected.append('is truncated or not an .npz file')
  elif damage == 'crc':  # one byte of the stored (uncompressed) train_features changed
    start = data.index(arrays['train_features'].tobytes()[:64])
    path.write_bytes(data[:start + 100] + bytes([data[start + 100] ^ 1]) + data[start + 101:])
    expected.append("key 'train_features' cannot be read (BadZipFile")
  elif damage == 'npy':
    np.save(tmp_path / 'f.npy', arrays['train_features'])
    os.replace(tmp_path / 'f.npy', path)
    expected.append('is a single .npy array, not an .npz')
  else:  # an object array whose pickle would run code
    marker = tmp_path / 'marker'
    arrays['label_names'] = np.array([_RunsCode(f'touch {marker}')] * 5, object)
    np.savez(path, **arrays)
    expected.append("key 'label_names' cannot be read: it is an object array")
  with pytest.raises(errors.InvalidInputError) as error:
    features.load_source(ml_collections.ConfigDict({'path': str(path)}))
  for text in expected:
    assert text in str(error.value)
  assert not (tmp_path / 'marker').exists()
