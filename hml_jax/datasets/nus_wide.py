"""NUS-WIDE as Cole et al. use it ("Multi-label learning from single positive labels", CVPR 2021;
the paper's NUS-WIDE): 81 concepts.

Two on-disk formats, tried in this order:
1. Cole et al.'s own subset (they re-crawled the Flickr images and publish no script, only the
   result): `formatted_{train,val}_{images,labels}.npy` in the manual_dir, 150,000 train / 60,260
   test images. 'train' = formatted_train, 'test' = formatted_val, rows as stored; labels are
   their 0/1 float matrix; filenames are the stored paths. Each image path is resolved relative to
   the manual_dir, or to manual_dir/Flickr if it is not there (Cole et al.'s loader reads
   Flickr/<path>). Label names come from `Concepts81.txt` in the manual_dir if present (one name
   per line, in label order), else 'concept_0'..'concept_80'. No file is unpickled: these files
   circulate through file-sharing links, and a pickle can run any code. An images file that is
   an object array of str (its elements pickled) is read by a restricted unpickler that admits
   only the three names of numpy's pickle of such an array, with their exact arguments
   (load_npy); anything else is refused, naming the file.
2. The official NUS-WIDE lists, used when no formatted_*.npy file is present:
   `ImageList/{Train,Test}Imagelist.txt` (paths such as `actor\\0001_2124494179.jpg`, relative
   to `Flickr/`), `Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt` (one 0/1 per
   line, aligned with the image list) and `Concepts81.txt` (label order). Kept: the images whose
   file exists under Flickr/ (many of the original Flickr images can no longer be crawled; how
   many were missing is logged) and that have at least one positive, in list order. Filenames are
   the list's paths with '/' separators, relative to Flickr/. This is not Cole et al.'s subset:
   their rows are not reproducible from the official files.
"""
import os
import pickle
from typing import List, Tuple

from absl import logging
import numpy as np

from hml_jax.datasets import common
from hml_jax.runtime import errors

NUM_LABELS = 81
FORMATTED_SPLITS = {'train': 'train', 'test': 'val'}
OFFICIAL_SPLITS = {'train': 'Train', 'test': 'Test'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put either of these two layouts in the manual_dir (by default <data_dir>/downloads/manual).
(1) Cole et al.'s re-crawled subset, as their data/nuswide folder
    (https://github.com/elijahcole/single-positive-multi-label/tree/main/data):
  <manual_dir>/formatted_train_images.npy, formatted_train_labels.npy,
               formatted_val_images.npy, formatted_val_labels.npy
      (from https://zenodo.org/records/10162606)
  <manual_dir>/Flickr/<path stored in formatted_*_images.npy>
      (Flickr.zip from the NUS-WIDE authors, unzipped in the manual_dir)
  <manual_dir>/Concepts81.txt (optional: label names, one per line)
(2) The official NUS-WIDE files (https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/
    nuswide/NUS-WIDE.html), used only if no formatted_*.npy file is there:
  <manual_dir>/ImageList/TrainImagelist.txt and TestImagelist.txt
  <manual_dir>/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt and _Test.txt
  <manual_dir>/Concepts81.txt
  <manual_dir>/Flickr/<concept folder>/<image>.jpg
"""


def _require(path):
  return common.require_path(path, NusWide.name, MANUAL_DOWNLOAD_INSTRUCTIONS)


def formatted_paths(root, split: str) -> Tuple[str, str]:
  """(images .npy, labels .npy) of split in Cole et al.'s format."""
  prefix = os.path.join(os.fspath(root), f'formatted_{FORMATTED_SPLITS[split]}')
  return prefix + '_images.npy', prefix + '_labels.npy'


def detect_format(root) -> str:
  """'formatted' if any formatted_*.npy file is in root, else 'official' if ImageList/ is."""
  root = os.fspath(root)
  formatted = [p for split in ('train', 'test') for p in formatted_paths(root, split)]
  if any(os.path.exists(p) for p in formatted):
    for path in formatted:
      _require(path)
    return 'formatted'
  image_list = os.path.join(root, 'ImageList')
  if os.path.exists(image_list):
    return 'official'
  raise errors.MissingInputError(
      f'{NusWide.name}: expected {formatted[0]} (and the other formatted_*.npy files) or '
      f'{image_list}; neither exists. Place the dataset in the manual_dir as its '
      f'MANUAL_DOWNLOAD_INSTRUCTIONS say:\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')


def read_concepts(root, required: bool) -> List[str]:
  """The 81 names of Concepts81.txt (one per line); 'concept_<i>' if absent and not required."""
  path = os.path.join(os.fspath(root), 'Concepts81.txt')
  if not os.path.exists(path) and not required:
    return [f'concept_{i}' for i in range(NUM_LABELS)]
  with open(_require(path)) as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != NUM_LABELS or len(set(names)) != NUM_LABELS:
    raise errors.InvalidInputError(
        f'{path}: expected {NUM_LABELS} distinct concept names, one per line, got '
        f'{len(names)} ({len(set(names))} distinct)')
  return names


# A one-line conversion of an object array of paths to a unicode ('U') array, which loads without
# pickle: for the user to run where they trust the file (it unpickles it).
CONVERT_COMMAND = ('python -c "import numpy as np; np.save({path!r}, '
                   'np.load({path!r}, allow_pickle=True).astype(str))"')
# What numpy's pickle of a 1-D object array names (numpy 1.x: numpy.core, 2.x: numpy._core).
RECONSTRUCT = {('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', '_reconstruct')}


class UnsafeNpyError(errors.InvalidInputError):
  """A .npy file that could only be read by running code it names (a pickle)."""


class _Refused(Exception):
  """Inside the restricted unpickler: the pickle is not numpy's of a flat array of str."""


class _ObjectDtype:
  """Stands for numpy.dtype('O'), the one dtype the pickle of an object array may build."""

  def __setstate__(self, state):
    if state != (3, '|', None, None, None, -1, -1, 63):
      raise _Refused(f'a dtype state {state!r} (expected that of dtype object)')


class _ObjectArray:
  """Stands for the ndarray that numpy's _reconstruct makes; its state must be a 1-D object
  array's: (1, (n,), dtype object, False, [n str])."""

  def __init__(self):
    self.strings = None

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
      raise _Refused('an ndarray state that is not (1, shape, dtype, fortran, data)')
    _, shape, dtype, fortran, data = state
    if not (isinstance(shape, tuple) and len(shape) == 1 and type(shape[0]) is int):
      raise _Refused(f'an array of shape {shape!r} (expected 1-D)')
    if not isinstance(dtype, _ObjectDtype) or fortran is not False or type(data) is not list:
      raise _Refused('an array that is not a plain object array')
    if len(data) != shape[0]:
      raise _Refused(f'{len(data)} elements for shape {shape!r}')
    bad = next((x for x in data if type(x) is not str), None)
    if bad is not None:
      raise _Refused(f'an element of type {type(bad).__name__} (only str is read)')
    self.strings = data


class _Ndarray:
  """Stands for numpy.ndarray as _reconstruct's first argument. Like the two below it has no
  attribute a pickle could set (empty __slots__, no __setstate__): BUILD on it fails."""
  __slots__ = ()


class _Reconstruct:
  """Stands for numpy's _reconstruct(ndarray, (0,), b'b'): an empty _ObjectArray to BUILD."""
  __slots__ = ()

  def __call__(self, cls, shape, typecode):
    if type(cls) is not _Ndarray or shape != (0,) or typecode != b'b':
      raise _Refused(f'_reconstruct called with {shape!r}, {typecode!r}')
    return _ObjectArray()


class _Dtype:
  """Stands for numpy.dtype('O8', False, True), the object dtype, and no other."""
  __slots__ = ()

  def __call__(self, name, align, copy):
    if (name, align, copy) != ('O8', False, True):
      raise _Refused(f'dtype{(name, align, copy)!r} (only object is read)')
    return _ObjectDtype()


class _Encode:
  """Stands for _codecs.encode('b', 'latin1'), how pickle protocol 2 (numpy before 1.17) writes
  _reconstruct's b'b'; any other call is refused."""
  __slots__ = ()

  def __call__(self, text, encoding):
    if (text, encoding) != ('b', 'latin1'):
      raise _Refused(f'_codecs.encode{(text, encoding)!r}')
    return b'b'


class _StringArrayUnpickler(pickle.Unpickler):
  """Reads numpy's pickle of a 1-D object array of str, and nothing else.

  Every global the pickle names is answered by find_class: the names of such a pickle
  (_reconstruct, ndarray, dtype; _codecs.encode in protocol 2) by stand-ins defined above, which check their arguments and
  build no numpy object; any other name raises, so nothing a pickle names ever runs."""

  def find_class(self, module, name):
    if (module, name) in RECONSTRUCT:
      return _Reconstruct()
    if (module, name) == ('numpy', 'ndarray'):
      return _Ndarray()
    if (module, name) == ('numpy', 'dtype'):
      return _Dtype()
    if (module, name) == ('_codecs', 'encode'):
      return _Encode()
    if name == 'scalar' and module in {m for m, _ in RECONSTRUCT}:
      # numpy.str_ elements: an honest file, but reading them would need numpy's scalar().
      raise _Refused('its elements are numpy scalars, not str')
    raise _NamesCode(f'names {module}.{name}')

  def persistent_load(self, pid):
    raise _NamesCode('holds a persistent id')


class _NamesCode(_Refused):
  """The pickle names a global other than the three of numpy's object-array pickle."""


def _refusal(path: str, why: str, convertible: bool) -> UnsafeNpyError:
  """The error for a file that only unpickling could read. convertible: it looks like an honest
  object array, so the conversion command is offered; else it is to be replaced, not loaded."""
  message = (f'{path}: refused to read it: {why}. hml_jax never unpickles a data file (a pickle '
             'can run any code).')
  if convertible:
    return UnsafeNpyError(message +
                          ' If this is the published file and you trust it, convert it once to a '
                          'unicode array, which loads without pickle: ' +
                          CONVERT_COMMAND.format(path=path))
  return UnsafeNpyError(message + ' It is not a file of the published release: delete it and '
                        'download the release again; do not load it with allow_pickle=True.')


def read_object_strings(path: str, file) -> np.ndarray:
  """The str elements of the pickled 1-D object array that follows an .npy header in file, as a
  unicode array; UnsafeNpyError naming path for anything else."""
  try:
    array = _StringArrayUnpickler(file).load()
  except _NamesCode as error:
    raise _refusal(path,
                   f'its pickle {error}, which an array of paths never needs',
                   convertible=False) from None
  except _Refused as error:
    raise _refusal(path, f'its pickle is not a plain array of strings ({error})',
                   convertible=True) from None
  except Exception as error:  # pylint: disable=broad-except  (a malformed pickle raises anything)
    raise _refusal(path,
                   f'its pickle is malformed ({type(error).__name__}: {error})',
                   convertible=False) from None
  if type(array) is not _ObjectArray or array.strings is None:
    raise _refusal(path, 'its pickle is not an array', convertible=False)
  return np.array(array.strings, dtype=str).reshape(len(array.strings))


def load_npy(path: str, strings: bool = False) -> np.ndarray:
  """The array in the .npy file at path, never unpickled.

  Numeric and unicode arrays load with allow_pickle=False. With strings=True a 1-D object array
  of str (how Cole et al. stored image paths) is read by _StringArrayUnpickler; any other object
  array, and any file that is not an .npy (a bare pickle), is refused with UnsafeNpyError."""
  with open(path, 'rb') as f:
    try:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise errors.InvalidInputError(f'.npy format version {version} (1.0 and 2.0 are read)')
    except ValueError as error:
      raise _refusal(path, f'it is not an .npy file ({error})', convertible=False) from None
    if dtype.hasobject:
      if not strings or dtype != np.dtype(object) or fortran or len(shape) != 1:
        kind = 'a 1-D array of path strings' if strings else 'a numeric array'
        raise _refusal(path, f'it holds an object array (shape {shape}, dtype {dtype}) where '
                       f'{kind} belongs, and only unpickling could read it',
                       convertible=strings)
      return read_object_strings(path, f)
    # Checked before np.load, which allocates the declared shape before it reads the data.
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    held = os.path.getsize(path) - f.tell()
    if declared != held:
      raise errors.InvalidInputError(
          f'{path} declares a {shape} {dtype} array ({declared:,} bytes) but holds {held:,} '
          'bytes of data: it is truncated or damaged; copy it again from the published '
          'release.')
    f.seek(0)
    try:
      return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
      raise errors.InvalidInputError(
          f'{path} is not a readable .npy file ({type(error).__name__}: {error}); it may be '
          'truncated: copy it again from the published release.') from None


def read_formatted(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  images_path, labels_path = formatted_paths(root, split)
  images = load_npy(_require(images_path), strings=True)
  labels = load_npy(_require(labels_path))
  if images.ndim != 1 or images.dtype.kind not in 'US':
    raise errors.InvalidInputError(f'{images_path}: expected a 1-D array of path strings, got '
                                   f'shape {images.shape}, dtype {images.dtype}')
  if labels.dtype.kind not in 'biuf':
    raise errors.InvalidInputError(f'{labels_path}: expected a numeric 0/1 matrix, got dtype '
                                   f'{labels.dtype}')
  if labels.shape != (len(images), NUM_LABELS):
    raise errors.InvalidInputError(
        f'{labels_path}: expected shape ({len(images)}, {NUM_LABELS}) to match '
        f'{images_path}, got {labels.shape}')
  not_binary = np.argwhere((labels != 0) & (labels != 1))
  if len(not_binary):
    row, column = not_binary[0]
    raise errors.InvalidInputError(
        f'{labels_path}: labels must be 0 or 1, row {row} column {column} is '
        f'{labels[row, column]!r}')
  filenames = [x.decode() if isinstance(x, bytes) else str(x) for x in images]
  return filenames, labels.astype(np.uint8), read_concepts(root, required=False)


def read_official(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  root = os.fspath(root)
  official = OFFICIAL_SPLITS[split]
  names = read_concepts(root, required=True)
  list_path = _require(os.path.join(root, 'ImageList', f'{official}Imagelist.txt'))
  with open(list_path) as f:
    paths = [line.strip().replace('\\', '/') for line in f if line.strip()]
  labels = np.zeros((len(paths), NUM_LABELS), np.uint8)
  for column, name in enumerate(names):
    path = _require(
        os.path.join(root, 'Groundtruth', 'TrainTestLabels', f'Labels_{name}_{official}.txt'))
    values = []
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        value = line.strip()
        if not value:
          continue
        if value not in ('0', '1'):
          raise common.line_error(path, line_number, line, '0 or 1')
        values.append(value == '1')
    if len(values) != len(paths):
      raise errors.InvalidInputError(
          f'{path} has {len(values)} labels, {list_path} {len(paths)} images')
    labels[:, column] = values
  flickr = os.path.join(root, 'Flickr')
  exists = np.array([os.path.exists(os.path.join(flickr, p)) for p in paths], bool)
  keep = exists & labels.any(1)
  logging.info(
      '%s %s: %d of the %d images in %s are missing under %s; %d of the rest have no '
      'positive label. Keeping %d.', NusWide.name, split, np.sum(~exists), len(paths), list_path,
      flickr, np.sum(exists & ~labels.any(1)), np.sum(keep))
  return [p for p, k in zip(paths, keep) if k], labels[keep], names


def read_split(root, split: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """(filenames, labels (n, 81) uint8, concept names) of 'train' or 'test'; see the module
  docstring for the two formats."""
  common.check_split(split)
  if detect_format(root) == 'formatted':
    return read_formatted(root, split)
  return read_official(root, split)


def resolve_image(root, filename: str) -> str:
  """root/filename if it exists, else root/Flickr/filename; ValueError naming both if neither."""
  candidates = [
      os.path.join(os.fspath(root), filename),
      os.path.join(os.fspath(root), 'Flickr', filename)
  ]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise errors.InvalidInputError(
      f'{NusWide.name}: image {filename!r} found neither at {candidates[0]} nor '
      f'at {candidates[1]}')


class NusWide(common.PaperDatasetBuilder):
  """NUS-WIDE (81 concepts) in Cole et al.'s format, from the manual_dir (the concept names from
  Concepts81.txt)."""

  name = 'hml_nus_wide'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  NUM_LABELS = NUM_LABELS
  HOMEPAGE = ('https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/'
              'NUS-WIDE.html')

  def read_splits(self, root):
    return {split: read_split(root, split) for split in ('train', 'test')}

  def image_path(self, root, filename):
    return resolve_image(root, filename)
