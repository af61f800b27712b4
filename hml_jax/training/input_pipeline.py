"""Data for training and evaluation: a source, Cole et al.'s protocol, the splits.

  input_pipeline.load(config) -> Data(train, validation, test, label_names)

1. the source of config.dataset.name (hml_jax/datasets/registry.py: our TFDS builders, a folder
   of images, features, TFDS's catalog) gives the official train and test label matrices and
   their examples (hml_jax/data/sources.py);
2. the protocol (`apply_protocol`): observed labels are drawn for the whole official train split
   (labels.observe), then 20% of it becomes validation, scored with full labels like the test
   split;
3. each split batches its examples, in memory or streamed, one process's part of them with
   several processes (hml_jax/data/splits.py); images are decoded by hml_jax/data/decoders.py.
"""
import dataclasses
import logging
from typing import Dict, List, Optional

import numpy as np

from hml_jax.data import decoders
from hml_jax.data import grain_splits
from hml_jax.data import labels as labels_lib
from hml_jax.data import sources
from hml_jax.data import splits
from hml_jax.datasets import registry
from hml_jax.runtime import errors


@dataclasses.dataclass
class Data:
  train: splits.Split
  validation: splits.Split
  test: splits.Split
  label_names: List[str]
  # Features mode with config.dataset.standardize='standardize': the training rows' per-dimension
  # {'mean', 'std'} (D,) that every split was standardized with (saved with the run).
  feature_statistics: Optional[Dict[str, np.ndarray]] = None
  # A generated dataset's {split: digest of its pixels and labels} (datasets/digests.py).
  digests: Optional[Dict[str, str]] = None


# ------------------------------------------------------------------------------------------------
# The protocol.


def _check_source(source: sources.Source, config):
  labels_lib.check_binary(source.train_labels, f'{source.name} train labels')
  labels_lib.check_binary(source.test_labels, f'{source.name} test labels')
  if source.train_labels.shape[1] != source.test_labels.shape[1]:
    raise errors.InvalidInputError(
        f'{source.name}: train has {source.train_labels.shape[1]} labels, test '
        f'{source.test_labels.shape[1]}.')
  for split, labels in (('train', source.train_labels), ('test', source.test_labels)):
    if not len(labels):
      raise errors.InvalidInputError(f'{source.name}: the {split} split is empty.')
  if source.train_examples is None or source.train_examples.ndim != 4:
    return
  for split, images in (('train', source.train_examples), ('test', source.test_examples)):
    expected = (config.image_size, config.image_size)
    if images.shape[1:3] != expected:
      raise errors.InvalidInputError(
          f'Images of {source.name} split {split!r} are {images.shape[1:3]}, but '
          f'config.image_size is {config.image_size}: set config.image_size={images.shape[1]}.')
  channels = source.train_examples.shape[-1]
  for key in ('mean', 'std'):
    if len(config.dataset[key]) not in (1, channels):
      raise errors.InvalidInputError(
          f'config.dataset.{key} has {len(config.dataset[key])} values but the images '
          f'of {source.name} have {channels} channel(s).')


def protocol_indices(train_labels: np.ndarray, config):
  """Steps 2-3 of Cole et al.'s protocol on the official train split's label matrix:
  (observed labels of the whole split, train rows, validation rows)."""
  observed = labels_lib.observe(train_labels,
                                config.label_scenario,
                                seed=config.label_seed,
                                fraction=config.positive_fraction)
  train_rows, validation_rows = labels_lib.validation_split(len(train_labels),
                                                            seed=config.validation_seed,
                                                            fraction=config.validation_fraction)
  return observed, train_rows, validation_rows


def _rows_of_index(num_official: int, rows: np.ndarray) -> np.ndarray:
  rows_of_index = np.full(num_official, -1, np.int64)
  rows_of_index[rows] = np.arange(len(rows))
  return rows_of_index


def apply_protocol(source: sources.Source, config) -> Data:
  """Train / validation / test splits with the protocol of Cole et al. (CVPR 2021).

  1. observed labels for the whole official train split (labels.observe, config.label_seed);
  2. validation = config.validation_fraction of the train split (config.validation_seed), unless
     the source brings its own validation split (features .npz with val_*);
  3. validation and test keep their true, full labels.
  """
  _check_source(source, config)
  train_labels = source.train_labels
  if source.validation_labels is not None:
    observed = labels_lib.observe(train_labels,
                                  config.label_scenario,
                                  seed=config.label_seed,
                                  fraction=config.positive_fraction)
    train_rows = np.arange(len(train_labels))
    validation_rows = None
  else:
    observed, train_rows, validation_rows = protocol_indices(train_labels, config)

  feature_statistics = None
  if source.train_examples is not None and source.train_examples.dtype == np.float32:
    source, feature_statistics = standardize_features(source, train_rows,
                                                      config.dataset.standardize)
  if source.train_examples is not None:
    if validation_rows is None:
      validation = splits.ArraySplit(source.validation_examples, source.validation_labels,
                                     source.validation_labels)
    else:
      validation = splits.ArraySplit(source.train_examples[validation_rows],
                                     train_labels[validation_rows], train_labels[validation_rows])
    train = splits.ArraySplit(source.train_examples[train_rows],
                              train_labels[train_rows],
                              observed[train_rows],
                              max_shift=config.augment_max_shift)
    test = splits.ArraySplit(source.test_examples, source.test_labels, source.test_labels)
  else:
    dataset = config.dataset
    common = dict(image_size=config.image_size, decoder=decoders.image_decoder(dataset))
    if isinstance(source.train_records, grain_splits.IndexedRecords):  # array_record: grain
      split_class = grain_splits.GrainImageSplit
      common.update(workers=dataset.workers, max_pixels=decoders.max_image_pixels(dataset))
    else:  # tfrecord files or a folder: tf.data
      split_class = splits.ImageSplit
      common.update(shuffle_buffer=dataset.shuffle_buffer,
                    parallel_calls=dataset.parallel_calls,
                    exact_shuffle=source.exact_shuffle)
    num_official = len(train_labels)
    train = split_class(source.train_records,
                        _rows_of_index(num_official, train_rows),
                        train_labels[train_rows],
                        observed[train_rows],
                        flip=dataset.augment_flip,
                        **common)
    validation = split_class(source.train_records,
                             _rows_of_index(num_official, validation_rows),
                             train_labels[validation_rows],
                             train_labels[validation_rows],
                             flip=False,
                             **common)
    test = split_class(source.test_records,
                       np.arange(len(source.test_labels)),
                       source.test_labels,
                       source.test_labels,
                       flip=False,
                       **common)
  data = Data(train=train,
              validation=validation,
              test=test,
              label_names=[str(name) for name in source.label_names],
              feature_statistics=feature_statistics,
              digests=source.digests)
  logging.info(
      'Data %s: train %d (%.2f observed / %.2f true positives per image), validation %d, '
      'test %d, %d labels.', source.name, len(data.train),
      data.train.observed.sum(1).mean(),
      data.train.labels.sum(1).mean(), len(data.validation), len(data.test), len(data.label_names))
  return data


FEATURE_STANDARDIZATIONS = ('none', 'standardize', 'l2')


def standardize_features(source: sources.Source, train_rows: np.ndarray, how: str):
  """(source, statistics) with features-mode inputs rescaled (config.dataset.standardize):
  'none'; 'standardize', each dimension to zero mean and unit variance with the mean and std of
  the training rows only (a dimension constant there, e.g. a dead ReLU, keeps std 1); 'l2', each
  row to unit L2 norm (no statistics). A linear head trained by Adam is sensitive to the features'
  scale (docs/results.md, "Features mode and feature scale")."""
  if how not in FEATURE_STANDARDIZATIONS:
    raise errors.InvalidInputError(f'config.dataset.standardize={how!r}: choose one of '
                                   f'{list(FEATURE_STANDARDIZATIONS)}.')
  if how == 'none':
    return source, None
  if how == 'l2':

    def transform(x):
      return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    statistics = None
  else:
    training = source.train_examples[train_rows].astype(np.float64)
    mean, std = training.mean(0), training.std(0)
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0)
    statistics = {'mean': mean.astype(np.float32), 'std': std.astype(np.float32)}

    def transform(x):
      return ((x - statistics['mean']) / statistics['std']).astype(np.float32)

  replaced = {
      'train_examples': transform(source.train_examples),
      'test_examples': transform(source.test_examples)
  }
  if source.validation_examples is not None:
    replaced['validation_examples'] = transform(source.validation_examples)
  return dataclasses.replace(source, **replaced), statistics


def fingerprint(data: Data) -> str:
  """SHA-256 of the label names and every split's labels and observed labels (in row order)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256('\n'.join(data.label_names).encode())
  for split in (data.train, data.validation, data.test):
    for matrix in (split.labels, split.observed):
      digest.update(np.ascontiguousarray(matrix, np.int8).tobytes())
      digest.update(str(matrix.shape).encode())
  return digest.hexdigest()


def load(config) -> Data:
  """The dataset of config.dataset, split and labelled by Cole et al.'s protocol."""
  return apply_protocol(registry.load_source(config.dataset), config)
