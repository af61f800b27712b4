"""hml_jax.datasets.catalog: TFDS's prepared voc/2012 and coco/2014 in Cole et al.'s format.

tfds.testing.mock_data does not support the partial / skipped decoding the adapter uses, so the
tests prepare tiny stand-in builders with the catalog datasets' feature specs (the subset the
adapter reads, plus a distractor) under test-only names, and point the adapter's specs at them.
Expected label matrices and row orders are direct NumPy transcriptions of Cole et al.'s rules.
"""
import dataclasses
import io
import os
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hml_jax.data import splits
from hml_jax.datasets import catalog
from hml_jax.datasets import registry
from hml_jax.datasets import voc2012

COCO_NAMES = [f'category_{i}' for i in range(80)]

# Per split: key -> (label indices, distractor labels). VOC's distractor is `labels` (with the
# difficult objects), which the adapter must not read: a difficult-only image has no positive.
VOC_DATA = {
    'train': {
        '2008_000008.jpg': ([14, 12], [14, 12]),
        '2007_000032.jpg': ([0], [0, 14]),
        '2008_000002.jpg': ([], [19]),  # only difficult objects: dropped
        '2007_000027.jpg': ([14], [14]),
        '2009_000001.jpg': ([], []),  # no object: dropped
        '2007_000039.jpg': ([19, 4, 4], [19, 4])
    },
    'validation': {
        '2007_000033.jpg': ([0], [0]),
        '2007_000042.jpg': ([18], [18, 1]),
        '2007_000061.jpg': ([], [3])
    },  # dropped
    'test': {
        '2008_000001.jpg': ([], [])
    },  # VOC 2012's test: no annotations, unused
}
# Per split: image id -> object labels (repeats: several objects of a class).
COCO_DATA = {
    'train': {
        9: [1, 1, 79],
        10: [0],
        2: [5],
        100: [3, 7],
        25: [0, 3],
        7: []
    },
    'validation': {
        1: [60],
        11: [2, 2],
        3: [],
        20: [79]
    },
}


def jpeg(seed: int) -> bytes:
  """A tiny JPEG whose pixels depend on seed."""
  pixels = np.random.RandomState(seed).randint(0, 256, (6, 5, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def image_of(key) -> bytes:
  return jpeg(zlib.crc32(str(key).encode()))


class HmlTestCatalogVoc(tfds.core.GeneratorBasedBuilder):
  """A stand-in for voc/2012 (same features the adapter reads)."""
  name = 'hml_test_catalog_voc'
  VERSION = tfds.core.Version('5.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image':
                tfds.features.Image(),
            'image/filename':
                tfds.features.Text(),
            'labels':
                tfds.features.Sequence(tfds.features.ClassLabel(names=voc2012.LABEL_NAMES)),
            'labels_no_difficult':
                tfds.features.Sequence(tfds.features.ClassLabel(names=voc2012.LABEL_NAMES)),
        }))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in VOC_DATA}

  def _generate_examples(self, split):
    for filename, (no_difficult, with_difficult) in VOC_DATA[split].items():
      yield filename, {
          'image': image_of(filename),
          'image/filename': filename,
          'labels': with_difficult,
          'labels_no_difficult': no_difficult
      }


class HmlTestCatalogCoco(tfds.core.GeneratorBasedBuilder):
  """A stand-in for coco/2014 (same features the adapter reads)."""
  name = 'hml_test_catalog_coco'
  VERSION = tfds.core.Version('1.1.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict({
                                     'image':
                                         tfds.features.Image(encoding_format='jpeg'),
                                     'image/filename':
                                         tfds.features.Text(),
                                     'image/id':
                                         np.int64,
                                     'objects':
                                         tfds.features.Sequence({
                                             'label': tfds.features.ClassLabel(names=COCO_NAMES),
                                             'is_crowd': np.bool_,
                                         }),
                                 }))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in COCO_DATA}

  def _generate_examples(self, split):
    for image_id, labels in COCO_DATA[split].items():
      yield image_id, {
          'image': image_of(image_id),
          'image/filename': f'{image_id:012d}.jpg',
          'image/id': image_id,
          'objects': [{
              'label': label,
              'is_crowd': False
          } for label in labels]
      }


def expected_rows(data, num_labels, sort_key):
  """Cole et al.: keep the keys with a positive, sort them, one multi-hot row each."""
  keys = sorted(
      (key for key, value in data.items() if len(value[0] if isinstance(value, tuple) else value)),
      key=sort_key)
  labels = np.zeros((len(keys), num_labels), np.uint8)
  for row, key in enumerate(keys):
    value = data[key]
    labels[row, list(value[0] if isinstance(value, tuple) else value)] = 1
  return keys, labels


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('catalog')
  for builder_class in (HmlTestCatalogVoc, HmlTestCatalogCoco):
    builder_class(data_dir=str(directory)).download_and_prepare()
  return str(directory)


def use_test_builder(monkeypatch, name, builder_name):
  monkeypatch.setitem(catalog.SPECS, name,
                      dataclasses.replace(catalog.SPECS[name], builder_name=builder_name))


def read_records(records, shuffle_seed):
  return [(int(r['index']), bytes(r['image'])) for r in tfds.as_numpy(records(shuffle_seed))]


def check_source(source, data, splits, num_labels, sort_key):
  for ours, theirs, labels, records in (('train', splits['train'], source.train_labels,
                                         source.train_records),
                                        ('test', splits['test'], source.test_labels,
                                         source.test_records)):
    keys, expected = expected_rows(data[theirs], num_labels, sort_key)
    np.testing.assert_array_equal(labels, expected, err_msg=ours)
    assert labels.dtype == np.uint8
    # Storage order: every kept image once, at its row; its bytes are the ones written.
    stored = read_records(records, None)
    assert sorted(index for index, _ in stored) == list(range(len(keys)))
    for index, encoded in stored:
      assert encoded == image_of(keys[index])
      np.testing.assert_array_equal(
          tf.io.decode_jpeg(encoded).numpy(),
          tf.io.decode_jpeg(image_of(keys[index])).numpy())
    # A seeded order is the same for the same seed, and holds the same records.
    shuffled = read_records(records, 7)
    assert shuffled == read_records(records, 7)
    assert sorted(shuffled) == sorted(stored)


def test_voc(data_dir, monkeypatch):
  use_test_builder(monkeypatch, 'voc/2012', HmlTestCatalogVoc.name)
  config = ml_collections.ConfigDict({'name': 'voc/2012', 'data_dir': data_dir})
  # Through the pipeline's dispatch on config.dataset.name.
  source = registry.load_source(config)
  assert source.label_names == list(voc2012.LABEL_NAMES)
  splits = {'train': 'train', 'test': 'validation'}
  check_source(source, VOC_DATA, splits, 20, str)
  # 4 of the 6 train images and 2 of the 3 validation ones have a non-difficult object.
  assert len(source.train_labels) == 4 and len(source.test_labels) == 2

  # The second load reads the cached (keys, labels), with the same result.
  builder = tfds.builder(HmlTestCatalogVoc.name, data_dir=data_dir)
  caches = sorted(f for f in os.listdir(builder.data_dir) if f.startswith('hml_cole_'))
  assert caches == ['hml_cole_v2_train.npz', 'hml_cole_v2_validation.npz']
  again = catalog.load_source(config)
  np.testing.assert_array_equal(again.train_labels, source.train_labels)
  np.testing.assert_array_equal(again.test_labels, source.test_labels)
  assert read_records(again.test_records, None) == read_records(source.test_records, None)


def test_coco(data_dir, monkeypatch):
  use_test_builder(monkeypatch, 'coco/2014', HmlTestCatalogCoco.name)
  config = ml_collections.ConfigDict({'name': 'coco/2014', 'data_dir': data_dir})
  source = catalog.load_source(config)
  assert source.label_names == COCO_NAMES
  check_source(source, COCO_DATA, {'train': 'train', 'test': 'validation'}, 80, str)
  # Cole et al.'s string order: '10' < '100' < '2' < '25' < '9'.
  keys, _ = expected_rows(COCO_DATA['train'], 80, str)
  assert keys == [10, 100, 2, 25, 9]
  np.testing.assert_array_equal(np.flatnonzero(source.train_labels[4]), [1, 79])  # id 9


def test_not_prepared(tmp_path):
  for name, builder in (('voc/2012', 'hml_voc2012'), ('coco/2014', 'hml_coco2014')):
    config = ml_collections.ConfigDict({'name': name, 'data_dir': str(tmp_path)})
    with pytest.raises(FileNotFoundError) as error:
      catalog.load_source(config)
    message = str(error.value)
    assert f'tfds build {name}' in message and builder in message
    assert 'not prepared' in message
  assert catalog.CATALOG_NAMES == ('voc/2012', 'coco/2014')
  with pytest.raises(ValueError, match='Unknown catalog dataset'):
    catalog.load_source(ml_collections.ConfigDict({'name': 'voc/2007', 'data_dir': ''}))


@pytest.mark.parametrize('count', [2, 3, 5])
def test_processes_read_disjoint_slices_of_the_stored_records(data_dir, monkeypatch, count):
  use_test_builder(monkeypatch, 'coco/2014', HmlTestCatalogCoco.name)
  source = catalog.load_source(
      ml_collections.ConfigDict({
          'name': 'coco/2014',
          'data_dir': data_dir
      }))
  for theirs, records, num_rows in (('train', source.train_records, len(source.train_labels)),
                                    ('validation', source.test_records, len(source.test_labels))):
    # Every stored record has its row, or -1 for an image without a positive (dropped).
    assert len(records) == len(COCO_DATA[theirs])
    assert sorted(records.storage_indices.tolist()) == [-1] + list(range(num_rows))
    sizes = splits.part_sizes(records.storage_indices, np.arange(num_rows), count)
    seen = []
    for p in range(count):  # 5 processes: more than the 4 validation records, one part empty
      rows = [int(r['index']) for r in tfds.as_numpy(records(None, p, count))]
      kept = records.part_indices(p, count)
      assert sorted(rows) == sorted(kept[kept >= 0].tolist()) and len(rows) == sizes[p]
      assert sorted(int(r['index']) for r in tfds.as_numpy(records(3, p, count))) == sorted(rows)
      seen.extend(rows)
    assert sorted(seen) == list(range(num_rows))  # disjoint and covering the kept images
