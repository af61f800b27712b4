"""The source registry: config.dataset.name -> the loader that returns its sources.Source.

  - our TFDS builders (OUR_BUILDERS): the embedded composite_digits, glyph_pretraining,
    glyph_source and glyph_digits, and the paper's hml_voc2012 / hml_coco2014 / hml_cub /
    hml_nus_wide (from the original files in TFDS's manual_dir);
  - 'folder': your own images plus CSV files (folder.py);
  - 'features': precomputed features in an .npz (features.py);
  - 'voc/2012', 'coco/2014': TFDS's catalog datasets, prepared by the user (catalog.py).
"""
import contextlib
import io
import logging
import os
import time
import zipfile
from typing import Tuple

import numpy as np

from hml_jax.data import grain_splits
from hml_jax.data import sources
from hml_jax.data import splits
from hml_jax.datasets import digests
from hml_jax.datasets import register_all
from hml_jax.runtime import errors

# The TFDS builders of hml_jax/datasets: prepared offline (generated or from manual_dir files).
OUR_BUILDERS = ('composite_digits', 'glyph_digits', 'glyph_pretraining', 'glyph_source',
                'hml_voc2012', 'hml_coco2014', 'hml_cub', 'hml_nus_wide')


def check_inputs(dataset_config) -> None:
  """Cheap checks of the files config.dataset names (they exist; a CSV header parses; a features
  file is a zip archive), so that a mistyped path is reported in a second, before any weights are
  downloaded or any dataset prepared. The loaders check the contents in full later."""
  name = dataset_config.name
  path = dataset_config.path or ''
  if name in ('folder', 'features') and not path:
    what = 'the folder holding train.csv' if name == 'folder' else 'an .npz file of features'
    raise errors.InvalidInputError(
        f'config.dataset.path is empty: dataset {name!r} needs {what} '
        f'(--config.dataset.path={"DIR" if name == "folder" else "FILE.npz"}).')
  if name == 'folder':
    from hml_jax.datasets import folder  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(path):
      raise errors.MissingInputError(
          f'Dataset folder {path} (config.dataset.path) does not exist or is not a folder.')
    train_csv = os.path.join(path, 'train.csv')
    if not os.path.isfile(train_csv):
      raise errors.MissingInputError(
          f'{train_csv} does not exist: a folder dataset needs train.csv (lines '
          '`filename,labels`, docs/datasets.md) in config.dataset.path.')
    folder.read_csv(train_csv)
  elif name == 'features':
    if not os.path.isfile(path):
      raise errors.MissingInputError(f'Features file {path} (config.dataset.path) does not exist.')
    if not zipfile.is_zipfile(path):
      raise errors.InvalidInputError(
          f'{path} (config.dataset.path) is not an .npz file (a zip archive), or it is truncated: '
          'write it again with numpy.savez (docs/datasets.md, features mode).')
  elif name in OUR_BUILDERS:
    manual_dir = dataset_config.manual_dir or ''
    if (manual_dir and '://' not in manual_dir and not os.path.isdir(manual_dir) and
        not _tfds_builder(dataset_config).is_prepared()):
      raise errors.MissingInputError(
          f'config.dataset.manual_dir={manual_dir} does not exist: put the original files of '
          f'{name} there (docs/datasets.md says which), or point manual_dir at them.')


def _tfds_builder(dataset_config):
  """The TFDS builder of one of OUR_BUILDERS (not prepared yet)."""
  from hml_jax.datasets import generated  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  register_all()
  name = dataset_config.name
  if dataset_config.builder_config:
    name = f'{name}/{dataset_config.builder_config}'
  if dataset_config.name not in OUR_BUILDERS:
    # Anything else would be a TFDS catalog name, which download_and_prepare would download.
    raise errors.InvalidInputError(
        f'Unknown dataset {dataset_config.name!r} (config.dataset.name); choose one of '
        f"{sorted(OUR_BUILDERS) + ['folder', 'features', 'voc/2012', 'coco/2014']}.")
  builder = tfds.builder(name, data_dir=dataset_config.data_dir or None)
  if dataset_config.name in digests.GENERATED and not builder.is_prepared():
    # Prepared as array_record, read without TensorFlow; one prepared as tfrecord (by TFDS
    # itself) is read as it is, through tf.data.
    builder = tfds.builder(name,
                           data_dir=dataset_config.data_dir or None,
                           file_format=generated.FILE_FORMAT)
  return builder


def load_tfds_builder(dataset_config):
  """The TFDS builder of config.dataset, prepared: generated offline for the embedded dataset,
  from the original files in config.dataset.manual_dir for the paper's datasets."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(dataset_config)
  manual_dir = dataset_config.manual_dir or None
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  # TFDS prints its "Downloading and preparing dataset Unknown size ..." lines to stdout, though
  # nothing is downloaded here: one log line says what happens instead. Errors still raise.
  preparing = not builder.is_prepared()
  if preparing:
    logging.info('Preparing %s in %s (once; later runs read it).', builder.info.full_name,
                 builder.data_dir)
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(download_config=download_config)
  return builder


def _data_source(builder, split: str):
  """The split's records by storage position, the image undecoded (array_record files)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def _array_record_labels(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(labels, index) of every record of an array_record split, in storage order."""
  source = _data_source(builder, split)
  labels = np.empty((len(source),) + tuple(builder.info.features['labels'].shape), np.uint8)
  index = np.empty(len(source), np.int64)
  for position in range(len(source)):
    record = source[position]
    labels[position], index[position] = record['labels'], record['index']
  return labels, index


def _array_record_examples(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images (N, H, W, C) uint8, labels (N, L) int32) of a generated split in official order,
  each PNG decoded by Pillow."""
  from hml_jax.datasets import generated  # pylint: disable=g-import-not-at-top
  source = _data_source(builder, split)
  channels = builder.info.features['image'].shape[-1]
  images = np.empty((len(source),) + tuple(builder.info.features['image'].shape), np.uint8)
  labels = np.empty((len(source),) + tuple(builder.info.features['labels'].shape), np.int32)
  for position in range(len(source)):
    record = source[position]
    images[record['index']] = generated.decode_png(record['image'], channels)
    labels[record['index']] = record['labels']
  return images, labels


def _read_label_cache(path: str, shard_lengths: np.ndarray):
  """(labels, storage_index) saved for a split stored in files of these lengths, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as saved:
      if np.array_equal(saved['shard_lengths'], shard_lengths):
        return saved['labels'], saved['storage_index']
  except (OSError, ValueError, KeyError):  # unreadable: read the labels again
    pass
  return None


def _tfds_label_matrix(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(labels (N, L) uint8 by official index, storage_index (N,): the official index of each record
  in storage order) of a TFDS split, without decoding an image. Cached next to the prepared data
  (with the split's file lengths, which a re-prepared split changes): for COCO this pass reads
  every record once."""
  from hml_jax.datasets import generated  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cache = os.path.join(builder.data_dir, f'hml_labels_v2_{split}.npz')
  shard_lengths = np.asarray(builder.info.splits[split].shard_lengths, np.int64)
  cached = _read_label_cache(cache, shard_lengths)
  if cached is not None:
    return cached
  start = time.time()
  if str(builder.info.file_format.value) == generated.FILE_FORMAT:
    labels, index = _array_record_labels(builder, split)
  else:
    # One file after the other (no interleaving): the records then come in storage order, the
    # positions a process's slice 'train[a:b]' (_tfds_records) selects.
    dataset = builder.as_dataset(split=split,
                                 shuffle_files=False,
                                 read_config=tfds.ReadConfig(interleave_cycle_length=1),
                                 decoders={'image': tfds.decode.SkipDecoding()})
    dataset = dataset.map(lambda x: {'labels': x['labels'], 'index': x['index']})
    parts = list(tfds.as_numpy(dataset.batch(4096)))
    index = np.concatenate([p['index'] for p in parts]).astype(np.int64)
    labels = np.concatenate([p['labels'] for p in parts])
  if not np.array_equal(np.sort(index), np.arange(len(index))):
    raise errors.InvalidInputError(
        f'{builder.info.full_name} split {split!r}: the "index" feature is not a '
        'permutation of 0..N-1; the prepared data is damaged. Delete '
        f'{builder.data_dir} and prepare it again.')
  labels = labels[np.argsort(index)].astype(np.uint8)
  try:
    # Never a half-written cache, even with several processes writing it at once.
    temporary = f'{cache}.tmp{os.getpid()}'
    with open(temporary, 'wb') as f:
      np.savez(f, labels=labels, storage_index=index, shard_lengths=shard_lengths)
    os.replace(temporary, cache)
  except OSError:  # a read-only data_dir only costs the pass next time
    pass
  logging.info('Read the labels of %s %s in %.1f s.', builder.info.full_name, split,
               time.time() - start)
  return labels, index


def _tfds_records(builder, split: str, storage_index: np.ndarray) -> splits.RecordReader:
  """The splits.RecordReader of a split of one of our builders (storage_index from
  _tfds_label_matrix).

  A process's part is a slice of record positions, 'train[a:b]' (`part_bounds`: the slices of
  tfds.even_splits / tfds.split_for_jax_process): TFDS opens only the files holding those
  records, skipping and taking within the first and the last. Not
  ReadConfig(input_context=tf.distribute.InputContext(...)): it deals out whole files, so it
  fails with fewer files than processes (TFDS writes a few thousand images to one or two files,
  and a pod has dozens of hosts) and its parts differ by up to a whole file of records, which
  the smallest part's step count would drop every epoch. Within its part a process orders
  training as one process does the whole split: files shuffled with the read_config's seed
  (seed, epoch), then ImageSplit's shuffle buffer.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def read(shuffle_seed, start, stop):
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed)
    dataset = builder.as_dataset(split=splits.tfds_subsplit(split, start, stop, len(storage_index)),
                                 shuffle_files=shuffle_seed is not None,
                                 read_config=read_config,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    return dataset.map(lambda x: {'image': x['image'], 'index': x['index']})

  return splits.RecordReader(f'{builder.info.full_name} {split}', read, storage_index)


def tfds_source(dataset_config, in_memory: bool) -> sources.Source:
  from hml_jax.datasets import generated  # pylint: disable=g-import-not-at-top
  builder = load_tfds_builder(dataset_config)
  label_names = builder.info.metadata.get('label_names') if builder.info.metadata else None
  array_record = str(builder.info.file_format.value) == generated.FILE_FORMAT
  if in_memory:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    arrays = {}
    for split in ('train', 'test'):
      if array_record:
        arrays[split] = _array_record_examples(builder, split)
        continue
      data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
      # TFDS stores examples in hashed-key order; restore the official order.
      order = np.argsort(data['index'], kind='stable')
      arrays[split] = data['image'][order], data['labels'][order].astype(np.int32)
    split_digests = None
    if builder.name in digests.GENERATED:
      split_digests = {split: digests.split_digest(*arrays[split]) for split in arrays}
      digests.check(builder.info.full_name, split_digests)
    return sources.Source(builder.info.full_name,
                          arrays['train'][1],
                          arrays['test'][1],
                          list(label_names or range(arrays['train'][1].shape[1])),
                          train_examples=arrays['train'][0],
                          test_examples=arrays['test'][0],
                          digests=split_digests)
  train_labels, train_storage = _tfds_label_matrix(builder, 'train')
  test_labels, test_storage = _tfds_label_matrix(builder, 'test')
  if array_record:  # streamed by grain (hml_jax/data/grain_splits.py)
    records = {
        split:
            grain_splits.IndexedRecords(f'{builder.info.full_name} {split}',
                                        _data_source(builder, split), storage)
        for split, storage in (('train', train_storage), ('test', test_storage))
    }
  else:
    records = {
        'train': _tfds_records(builder, 'train', train_storage),
        'test': _tfds_records(builder, 'test', test_storage)
    }
  return sources.Source(builder.info.full_name,
                        train_labels,
                        test_labels,
                        list(label_names or range(train_labels.shape[1])),
                        train_records=records['train'],
                        test_records=records['test'])


def load_source(dataset) -> sources.Source:
  """The source of a config's dataset sub-config (config.dataset), by its name."""
  name = dataset.name
  if name == 'features':
    from hml_jax.datasets import features  # pylint: disable=g-import-not-at-top
    return features.load_source(dataset)
  if name == 'folder':
    from hml_jax.datasets import folder  # pylint: disable=g-import-not-at-top
    return folder.load_source(dataset)
  if name in ('voc/2012', 'coco/2014'):  # TFDS's catalog, already prepared by the user
    from hml_jax.datasets import catalog  # pylint: disable=g-import-not-at-top
    return catalog.load_source(dataset)
  return tfds_source(dataset, in_memory=dataset.in_memory)
