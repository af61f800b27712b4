"""What the paper-dataset builders (voc2012, coco2014, cub, nus_wide) share: their base class
(PaperDatasetBuilder), the feature spec, image reading and error messages."""
import abc
import io
import os
from typing import Callable, Iterator, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hml_jax.runtime import errors


def features(num_labels: int) -> tfds.features.FeaturesDict:
  """The feature spec every paper-dataset builder uses."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'labels': tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8),
      'index': tfds.features.Scalar(dtype=np.int64),
      'filename': tfds.features.Text(),
  })


def check_split(split: str) -> None:
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def require_path(path: str, builder_name: str, instructions: str) -> str:
  """Returns path; raises FileNotFoundError naming it and the instructions if it does not exist."""
  if not os.path.exists(path):
    raise errors.MissingInputError(
        f'{builder_name}: expected {path}, which does not exist. Place the dataset in the '
        f'manual_dir as its MANUAL_DOWNLOAD_INSTRUCTIONS say:\n{instructions}')
  return path


def line_error(path: str, line_number: int, line: str, expected: str) -> ValueError:
  """The error for a malformed line of a label file (line numbers count from 1)."""
  return ValueError(f'{path}, line {line_number}: expected {expected}, got {line.rstrip()!r}')


def read_image(path: str) -> bytes:
  """The image file at path as 3-channel JPEG bytes.

  A 3-channel JPEG is returned unchanged (after checking that it decodes); anything else PIL can
  open (grayscale or CMYK JPEGs, other formats) is converted to RGB and encoded as JPEG (quality
  95), as Cole et al.'s loader does with `Image.open(path).convert('RGB')`. Raises ValueError
  naming the path when the file is missing or cannot be decoded.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as error:
    raise errors.InvalidInputError(f'Cannot read image {path}: {error}') from error
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format == 'JPEG' and image.mode == 'RGB':
        # Decode at 1/8 scale: still reads the whole entropy-coded stream, so a truncated or
        # corrupt file fails here rather than at training time, but skips most of the work.
        image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
        return data
      rgb = image.convert('RGB')
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise errors.InvalidInputError(f'Cannot decode image {path}: {error}') from error
  buffer = io.BytesIO()
  rgb.save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def generate_examples(filenames: Sequence[str], labels: np.ndarray,
                      resolve: Callable[[str], str]) -> Iterator[Tuple[int, dict]]:
  """Yields (index, example) in row order; resolve maps a stored filename to the file to read."""
  for index, (filename, row) in enumerate(zip(filenames, labels)):
    yield index, {
        'image': read_image(resolve(filename)),
        'labels': row,
        'index': index,
        'filename': filename
    }


class PaperDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One of the paper's datasets in Cole et al.'s format, built from the original files in the
  manual_dir. A subclass names it (name, NUM_LABELS, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS, and
  LABEL_NAMES when they are fixed; else read_splits gives them), reads its label files
  (read_splits) and says where an image is (image_path)."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  NUM_LABELS: int = 0
  HOMEPAGE: str = ''
  LABEL_NAMES: Sequence[str] = ()  # () when the label names come from the files

  @abc.abstractmethod
  def read_splits(self, root: str) -> dict:
    """{'train', 'test'} -> (filenames, labels (N, NUM_LABELS), label_names), every label file
    parsed before any image is read (so label errors come first)."""

  @abc.abstractmethod
  def image_path(self, root: str, filename: str) -> str:
    """The file of a stored filename."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(self.NUM_LABELS),
        supervised_keys=None,
        homepage=self.HOMEPAGE,
        # Names that come from the files are filled in when the dataset is prepared.
        metadata=tfds.core.MetadataDict(label_names=list(self.LABEL_NAMES)),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = self.read_splits(root)
    if not self.LABEL_NAMES:
      self.info.metadata['label_names'] = list(splits['train'][2])
    return {
        split: self._generate_examples(root, filenames, labels)
        for split, (filenames, labels, _) in splits.items()
    }

  def _generate_examples(self, root, filenames, labels):
    return generate_examples(filenames, labels, lambda f: self.image_path(root, f))
