"""TFDS's catalog datasets voc/2012 and coco/2014, already prepared by the user, converted to
Cole et al.'s protocol (config.dataset.name='voc/2012' or 'coco/2014').

The paper's builders (hml_voc2012, hml_coco2014 in this package) read the original files from the
manual_dir. Users who already have TFDS's own versions prepared can use them instead; this module
turns them into the same `sources.Source` (same splits, labels, kept images and row order):

  voc/2012:  TFDS 'train' -> train, 'validation' (official val) -> test. Labels from
             `labels_no_difficult` (the classes with a non-difficult object = the `1` entries of
             ImageSets/Main; `0` there means only difficult objects). Images without a positive
             are dropped; rows sorted by `image/filename` (`<id>.jpg`), as Cole et al. do.
  coco/2014: TFDS 'train' (train2014) -> train, 'validation' (val2014) -> test. Labels from
             `objects/label` (80 classes in category-id order, as the official files list
             them); images without an object are dropped; rows sorted by str(`image/id`) as
             strings ('10' < '9'), Cole et al.'s quirk.

Nothing is downloaded: a catalog dataset that is not prepared raises an error that says how to
prepare it, or which of our manual_dir builders to use instead.

The first use reads every example's key and labels once (no image is decoded) and caches the
result as an .npz next to the prepared data, with each stored record's row (-1: dropped). Images
are then streamed as encoded bytes; each record's key is mapped to its row by a hash table, and
the dropped images are filtered out. With several processes each reads only its slice of the
stored records (splits.part_bounds, as for our own builders).
"""
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from hml_jax.data import sources
from hml_jax.data import splits
from hml_jax.runtime import errors

CATALOG_NAMES = ('voc/2012', 'coco/2014')

# Bump when the conversion or the cache's content changes: older caches are then ignored.
# 2: with each stored record's row and the split's file lengths (per-process reading).
_CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
  """How to turn one catalog dataset into Cole et al.'s format."""
  builder_name: str  # what tfds.builder loads
  splits: Dict[str, str]  # our split ('train', 'test') -> the TFDS split
  key: str  # feature that identifies an example (a scalar string or int)
  label_decoding: Dict[str, Any]  # PartialDecoding spec of the label feature(s)
  # decoded example (key and label features only) -> 1-D tensor of label indices (may repeat)
  label_indices: Callable[[dict], Any]
  # the builder's FeaturesDict -> the ClassLabel whose names are the label names
  label_feature: Callable[[Any], Any]
  sort_key: Callable[[Any], Any]  # one key (str or int) -> what rows are sorted by
  manual_builder: str  # our manual_dir builder of the same data
  manual_config: str


SPECS: Dict[str, CatalogSpec] = {
    'voc/2012':
        CatalogSpec(
            builder_name='voc/2012',
            splits={
                'train': 'train',
                'test': 'validation'
            },
            key='image/filename',
            label_decoding={'labels_no_difficult': True},
            label_indices=lambda example: example['labels_no_difficult'],
            label_feature=lambda features: features['labels_no_difficult'].feature,
            sort_key=str,  # Cole et al.: sorted(file names)
            manual_builder='hml_voc2012',
            manual_config='configs/voc.py'),
    'coco/2014':
        CatalogSpec(
            builder_name='coco/2014',
            splits={
                'train': 'train',
                'test': 'validation'
            },
            key='image/id',
            label_decoding={'objects': {
                'label': True
            }},
            label_indices=lambda example: example['objects']['label'],
            label_feature=lambda features: features['objects']['label'],
            sort_key=lambda image_id: str(int(image_id)),  # Cole et al.: ids sorted as strings
            manual_builder='hml_coco2014',
            manual_config='configs/coco.py'),
}


def not_prepared_message(name: str, spec: CatalogSpec, data_dir: str) -> str:
  return (
      f'TFDS dataset {name!r} is not prepared in {data_dir}, and this project does not download '
      f'it. Either prepare it with TFDS, which needs network access:\n'
      f'  tfds build {name} --data_dir=<your data_dir>\n'
      f'and set config.dataset.data_dir to that data_dir; or use our builder '
      f'{spec.manual_builder!r} (config.dataset.name={spec.manual_builder}, see '
      f'{spec.manual_config}) with the original files in config.dataset.manual_dir.')


def _builder(name: str, spec: CatalogSpec, dataset_config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(spec.builder_name, data_dir=dataset_config.data_dir or None)
  if not builder.is_prepared():
    raise errors.MissingInputError(not_prepared_message(name, spec, builder.data_dir))
  return builder


def _read_keys_and_labels(builder, spec: CatalogSpec, tfds_split: str,
                          num_labels: int) -> Tuple[np.ndarray, np.ndarray]:
  """(keys (n,), labels (n, num_labels) uint8) of every example of a TFDS split, in storage
  order (the files one after the other: the positions a slice 'train[a:b]' selects), reading
  only the key and label features (no image)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoding = tfds.decode.PartialDecoding({spec.key: True, **spec.label_decoding})
  dataset = builder.as_dataset(split=tfds_split,
                               shuffle_files=False,
                               decoders=decoding,
                               read_config=tfds.ReadConfig(interleave_cycle_length=1))

  def keys_and_labels(example):
    indices = tf.cast(tf.reshape(spec.label_indices(example), [-1]), tf.int32)
    # Multi-hot of a variable-length list (empty -> zeros): a fixed shape, so batches are dense.
    counts = tf.reduce_sum(tf.one_hot(indices, num_labels, dtype=tf.int32), axis=0)
    return {'key': example[spec.key], 'labels': tf.cast(tf.minimum(counts, 1), tf.uint8)}

  dataset = dataset.map(keys_and_labels, num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(tfds.as_numpy(dataset.batch(4096)))
  if not parts:
    raise errors.InvalidInputError(f'{builder.info.full_name}: split {tfds_split!r} is empty.')
  keys = np.concatenate([part['key'] for part in parts])
  labels = np.concatenate([part['labels'] for part in parts])
  if keys.dtype.kind in 'OS':  # tf.string -> bytes -> str
    keys = np.array([key.decode('utf-8') for key in keys], dtype=str)
  else:
    keys = keys.astype(np.int64)
  return keys, labels


def cole_rows(keys: np.ndarray, labels: np.ndarray,
              sort_key: Callable[[Any], Any]) -> Tuple[np.ndarray, np.ndarray]:
  """Cole et al.'s rows: the examples with at least one positive, sorted by sort_key(key)."""
  if len(set(keys.tolist())) != len(keys):
    raise errors.InvalidInputError(
        'The catalog dataset has duplicate example keys; cannot order its rows.')
  kept = np.flatnonzero(labels.sum(axis=1) > 0)
  order = sorted(kept.tolist(), key=lambda i: sort_key(keys[i].item()))
  order = np.array(order, np.int64)
  return keys[order], labels[order]


def storage_rows(stored_keys: np.ndarray, row_keys: np.ndarray) -> np.ndarray:
  """(n,) int64: the row (position in row_keys) of each stored key, -1 for a key without a row
  (an image Cole et al. drop)."""
  row_of = {key: row for row, key in enumerate(row_keys.tolist())}
  return np.array([row_of.get(key, -1) for key in stored_keys.tolist()], np.int64)


def _split_rows(builder, spec: CatalogSpec, tfds_split: str,
                num_labels: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(keys, labels) of a split in Cole et al.'s row order, and the row of each stored record
  (-1: dropped); cached next to the prepared data with the split's file lengths (a re-prepared
  split may store its records otherwise)."""
  cache = os.path.join(builder.data_dir, f'hml_cole_v{_CACHE_VERSION}_{tfds_split}.npz')
  shard_lengths = np.asarray(builder.info.splits[tfds_split].shard_lengths, np.int64)
  if os.path.exists(cache):
    try:
      with np.load(cache, allow_pickle=False) as saved:
        keys, labels, rows = saved['keys'], saved['labels'], saved['storage_rows']
        same_files = np.array_equal(saved['shard_lengths'], shard_lengths)
      if same_files and labels.shape == (len(keys), num_labels):
        return keys, labels, rows
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache: read the labels again
  start = time.time()
  stored_keys, labels = _read_keys_and_labels(builder, spec, tfds_split, num_labels)
  keys, labels = cole_rows(stored_keys, labels, spec.sort_key)
  rows = storage_rows(stored_keys, keys)
  try:  # best effort: a read-only data_dir only costs the pass next time
    temporary = f'{cache}.tmp{os.getpid()}.npz'
    np.savez(temporary, keys=keys, labels=labels, storage_rows=rows, shard_lengths=shard_lengths)
    os.replace(temporary, cache)
  except OSError:
    pass
  logging.info('Read the labels of %s %s in %.1f s: kept %d of %d images (with a positive).',
               builder.info.full_name, tfds_split,
               time.time() - start, len(keys), len(stored_keys))
  return keys, labels, rows


def _records(builder, spec: CatalogSpec, tfds_split: str, keys: np.ndarray, rows: np.ndarray):
  """The split's splits.RecordReader: {'image': encoded bytes, 'index': row} of the kept
  images; rows: the row of each stored record (-1: dropped). A process reads only its slice of
  the stored records (see registry._tfds_records for why a slice)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  table = []  # built on first use, then kept alive as long as this reader

  def row_table():
    if not table:
      table.append(
          tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
              tf.constant(keys), tf.range(len(keys), dtype=tf.int64)),
                                    default_value=tf.constant(-1, tf.int64)))
    return table[0]

  def read(shuffle_seed: Optional[int], start: int, stop: int):
    row_of_key = row_table()
    decoding = tfds.decode.PartialDecoding({
        'image': True,
        spec.key: True
    },
                                           decoders={'image': tfds.decode.SkipDecoding()})
    dataset = builder.as_dataset(split=splits.tfds_subsplit(tfds_split, start, stop, len(rows)),
                                 shuffle_files=shuffle_seed is not None,
                                 read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
                                 decoders=decoding)
    dataset = dataset.map(lambda example: {
        'image': example['image'],
        'index': row_of_key.lookup(example[spec.key])
    })
    return dataset.filter(lambda record: record['index'] >= 0)  # images Cole et al. drop

  return splits.RecordReader(f'{builder.info.full_name} {tfds_split}', read, rows)


def load_source(dataset_config):
  """The prepared catalog dataset config.dataset.name ('voc/2012' or 'coco/2014') as an
  sources.Source in Cole et al.'s format (see the module docstring)."""
  name = dataset_config.name
  if name not in SPECS:
    raise errors.InvalidInputError(
        f'Unknown catalog dataset {name!r}; expected one of {sorted(SPECS)}.')
  spec = SPECS[name]
  builder = _builder(name, spec, dataset_config)
  label_names = [str(n) for n in spec.label_feature(builder.info.features).names]
  num_labels = len(label_names)
  splits = {
      ours: _split_rows(builder, spec, theirs, num_labels) for ours, theirs in spec.splits.items()
  }
  return sources.Source(builder.info.full_name,
                        splits['train'][1],
                        splits['test'][1],
                        label_names,
                        train_records=_records(builder, spec, spec.splits['train'],
                                               splits['train'][0], splits['train'][2]),
                        test_records=_records(builder, spec, spec.splits['test'], splits['test'][0],
                                              splits['test'][2]))
