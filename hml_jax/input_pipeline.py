"""Data for training and evaluation: TFDS splits -> observed labels -> NumPy batches.

The splits of the embedded dataset fit in memory, so they are read from TFDS once as NumPy arrays
and batched on the host. That makes the data order a pure function of (seed, epoch): an epoch is
a fresh permutation of the training images, so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""
import dataclasses
import logging
from typing import Iterator, List

import numpy as np

from hml_jax import labels as labels_lib


@dataclasses.dataclass
class Split:
  """images (N, H, W, C) uint8; labels (N, num_labels) 0/1 true labels; observed (N, num_labels)
  the labels training may use (equal to labels outside the training split)."""
  images: np.ndarray
  labels: np.ndarray
  observed: np.ndarray

  def __len__(self):
    return len(self.images)


@dataclasses.dataclass
class Data:
  train: Split
  validation: Split
  test: Split
  label_names: List[str]


def _load_tfds_split(builder, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  # TFDS stores examples in hashed-key order; restore generation order.
  order = np.argsort(arrays['index'], kind='stable')
  return arrays['image'][order], arrays['labels'][order].astype(np.int32)


def load_tfds_builder(dataset_config):
  """The TFDS builder of config.dataset, prepared (generated offline if not on disk yet)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from hml_jax.datasets import composite_digits  # pylint: disable=g-import-not-at-top,unused-import
  name = dataset_config.name
  if dataset_config.get('builder_config'):
    name = f'{name}/{dataset_config.builder_config}'
  try:
    builder = tfds.builder(name, data_dir=dataset_config.get('data_dir') or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f'Unknown dataset {dataset_config.name!r} (config.dataset.name): '
                     f'{error}') from None
  builder.download_and_prepare()
  return builder


def load(config) -> Data:
  """Train / validation / test splits with the protocol of Cole et al. (CVPR 2021).

  1. observed labels for the whole official train split (labels.observe, config.label_seed);
  2. validation = config.validation_fraction of the train split (config.validation_seed);
  3. validation and test keep their true, full labels.
  """
  builder = load_tfds_builder(config.dataset)
  train_images, train_labels = _load_tfds_split(builder, 'train')
  test_images, test_labels = _load_tfds_split(builder, 'test')
  for split, images in (('train', train_images), ('test', test_images)):
    expected = (config.image_size, config.image_size)
    if images.shape[1:3] != expected:
      raise ValueError(
          f'Images of {builder.info.full_name} split {split!r} are {images.shape[1:3]}, but '
          f'config.image_size is {config.image_size}: set config.image_size={images.shape[1]}.')
  channels = train_images.shape[-1]
  for key in ('mean', 'std'):
    if len(config.dataset[key]) not in (1, channels):
      raise ValueError(f'config.dataset.{key} has {len(config.dataset[key])} values but the images '
                       f'of {builder.info.full_name} have {channels} channel(s).')
  labels_lib.check_binary(train_labels, f'{builder.info.full_name} train labels')
  labels_lib.check_binary(test_labels, f'{builder.info.full_name} test labels')
  observed = labels_lib.observe(train_labels, config.label_scenario, seed=config.label_seed,
                                fraction=config.get('positive_fraction'))
  train_indices, validation_indices = labels_lib.validation_split(
      len(train_images), seed=config.validation_seed, fraction=config.validation_fraction)
  label_names = list(builder.info.metadata.get('label_names')
                     or [str(i) for i in range(train_labels.shape[1])])
  data = Data(
      train=Split(train_images[train_indices], train_labels[train_indices],
                  observed[train_indices]),
      validation=Split(train_images[validation_indices], train_labels[validation_indices],
                       train_labels[validation_indices]),
      test=Split(test_images, test_labels, test_labels),
      label_names=label_names)
  logging.info('Data %s: train %d (%.2f observed / %.2f true positives per image), validation %d, '
               'test %d, %d labels.', builder.info.full_name, len(data.train),
               data.train.observed.sum(1).mean(), data.train.labels.sum(1).mean(),
               len(data.validation), len(data.test), len(label_names))
  return data


def num_train_steps_per_epoch(split: Split, batch_size: int) -> int:
  """Training drops the last incomplete batch (fixed shapes: one compilation)."""
  return len(split) // batch_size


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.RandomState) -> np.ndarray:
  """Translates each image by up to max_shift pixels in each direction (edge pixels repeat)."""
  if max_shift <= 0:
    return images
  size_y, size_x = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode='edge')
  offsets = rng.randint(0, 2 * max_shift + 1, size=(len(images), 2))
  return np.stack([image[dy:dy + size_y, dx:dx + size_x]
                   for image, (dy, dx) in zip(padded, offsets)])


def train_batches(split: Split, batch_size: int, seed: int, epoch: int,
                  max_shift: int = 0) -> Iterator[dict]:
  """Batches of one epoch: {'images' uint8, 'labels' observed 0/1, 'indices' their rows}.

  The permutation and the augmentation depend only on (seed, epoch), so a resumed run sees the
  batches an uninterrupted one would have seen.
  """
  rng = np.random.RandomState([seed, epoch])
  permutation = rng.permutation(len(split))
  for step in range(num_train_steps_per_epoch(split, batch_size)):
    indices = np.sort(permutation[step * batch_size:(step + 1) * batch_size])
    yield {'images': random_shift(split.images[indices], max_shift, rng),
           'labels': split.observed[indices], 'indices': indices.astype(np.int32)}


def eval_batches(split: Split, batch_size: int) -> Iterator[dict]:
  """Every example once, in order; the last batch is padded to batch_size and 'mask' marks the
  real examples (evaluation never drops an example)."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    real = len(images)
    pad = batch_size - real
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)])
    yield {'images': images, 'labels': labels, 'mask': np.arange(batch_size) < real}
