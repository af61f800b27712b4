"""The four paper-dataset builders on tiny fixtures in each dataset's real on-disk format.

`read_split` is checked against independent NumPy transcriptions of Cole et al.'s preprocessing
(github.com/elijahcole/single-positive-multi-label, preproc/format_*.py), written here without
the modules' helpers; the builders are checked against read_split; and the error paths.
"""
import hashlib
import importlib
import json
import os
import re

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from hml_jax import methods
from hml_jax import models
from hml_jax.datasets import coco2014
from hml_jax.datasets import common
from hml_jax.datasets import cub
from hml_jax.datasets import nus_wide
from hml_jax.datasets import voc2012
from hml_jax.init_from import torchvision
from hml_jax.state import train_state
from hml_jax.training import input_pipeline
from hml_jax.training import train

from tests import dataset_fixtures

# ------------------------------------------------------------------------------------------------
# Cole et al.'s procedures, transcribed.

# format_pascal.py's catName_to_catID, in its (alphabetical) order.
COLE_PASCAL_CLASSES = [
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
    'tvmonitor'
]


def cole_pascal(root, phase):
  """phase 'train' or 'val' -> (image file names, label matrix)."""
  main = os.path.join(root, 'VOCdevkit', 'VOC2012', 'ImageSets', 'Main')
  last_field = {}  # (file name, class index) -> int of the line's last ' '-separated field
  for column, name in enumerate(COLE_PASCAL_CLASSES):
    with open(os.path.join(main, f'{name}_{phase}.txt')) as f:
      for line in f:
        fields = line.rstrip().split(' ')
        last_field[fields[0] + '.jpg', column] = int(fields[-1])
  names = np.array(sorted({image for image, _ in last_field}))
  matrix = np.zeros((len(names), 20))
  for (image, column), value in last_field.items():
    matrix[np.searchsorted(names, image), column] = value == 1
  keep = matrix.sum(1) > 0
  return list(names[keep]), matrix[keep]


def cole_coco(root, split):
  """split 'train' or 'val' -> (file names, label matrix, category names)."""
  with open(os.path.join(root, 'annotations', f'instances_{split}2014.json')) as f:
    data = json.load(f)
  category_ids = np.array([c['id'] for c in data['categories']])  # index = file position
  image_of = np.array([a['image_id'] for a in data['annotations']])
  category_of = np.array([a['category_id'] for a in data['annotations']])
  ids_as_strings = np.unique(image_of.astype(str))  # sorted as strings
  rows = np.array([np.nonzero(ids_as_strings == str(i))[0][0] for i in image_of])
  columns = np.array([np.nonzero(category_ids == c)[0][0] for c in category_of])
  matrix = np.zeros((len(ids_as_strings), len(category_ids)))
  matrix[rows, columns] = 1
  files = [f'{split}2014/COCO_{split}2014_{s.zfill(12)}.jpg' for s in ids_as_strings]
  return files, matrix, [c['name'] for c in data['categories']]


def cole_cub(root, names_path):
  """-> {'train': (files, matrix), 'val': (files, matrix)}, names; read positionally like Cole.
  Cole et al. read attributes.txt next to CUB_200_2011/; names_path: where the fixture put it."""
  base = os.path.join(root, 'CUB_200_2011')

  def column(path, index):
    with open(path) as f:
      return np.array([line.split(' ')[index].strip() for line in f])

  files = column(os.path.join(base, 'images.txt'), 1)
  is_train = column(os.path.join(base, 'train_test_split.txt'), 1).astype(int)
  names = column(names_path, 1)
  is_present = column(os.path.join(base, 'attributes', 'image_attribute_labels.txt'), 2)
  matrix = is_present.astype(int).reshape(len(files), 312)
  return {
      'train': (list(files[is_train == 1]), matrix[is_train == 1]),
      'val': (list(files[is_train != 1]), matrix[is_train != 1])
  }, list(names)


def official_nus_wide(root, split):
  """The official-lists rule: listed images present under Flickr/ with a positive, list order."""
  with open(os.path.join(root, 'Concepts81.txt')) as f:
    concepts = f.read().split()
  with open(os.path.join(root, 'ImageList', f'{split}Imagelist.txt')) as f:
    paths = [p.replace('\\', '/') for p in f.read().split()]
  matrix = np.stack([
      np.loadtxt(os.path.join(root, 'Groundtruth', 'TrainTestLabels', f'Labels_{c}_{split}.txt'),
                 dtype=int) for c in concepts
  ], 1)
  keep = matrix.any(1) & np.array([os.path.exists(os.path.join(root, 'Flickr', p)) for p in paths])
  return [p for p, k in zip(paths, keep) if k], matrix[keep], concepts


def expected(name, root):
  """{'train': (files, matrix), 'test': (files, matrix)}, label names, by Cole's procedure."""
  if name == 'voc':
    return {'train': cole_pascal(root, 'train'), 'test': cole_pascal(root, 'val')}, \
        COLE_PASCAL_CLASSES
  if name == 'coco':
    train, val = cole_coco(root, 'train'), cole_coco(root, 'val')
    assert train[2] == val[2]
    return {'train': train[:2], 'test': val[:2]}, train[2]
  if name.startswith('cub'):
    names_path = (os.path.join(root, 'CUB_200_2011', 'attributes', 'attributes.txt')
                  if name == 'cub_tgz_layout' else os.path.join(root, 'attributes.txt'))
    splits, names = cole_cub(root, names_path)
    return {'train': splits['train'], 'test': splits['val']}, names
  if name == 'nus_formatted':
    splits = {}
    for split, stored in (('train', 'train'), ('test', 'val')):
      splits[split] = (list(np.load(os.path.join(root, f'formatted_{stored}_images.npy'))),
                       np.load(os.path.join(root, f'formatted_{stored}_labels.npy')))
    with open(os.path.join(root, 'Concepts81.txt')) as f:
      return splits, f.read().split()
  train, test = official_nus_wide(root, 'Train'), official_nus_wide(root, 'Test')
  return {'train': train[:2], 'test': test[:2]}, train[2]


# ------------------------------------------------------------------------------------------------
# The cases: writer, module, TFDS name, folder the stored filenames are relative to.

CASES = {
    'voc': (dataset_fixtures.write_voc2012, voc2012, 'hml_voc2012',
            os.path.join('VOCdevkit', 'VOC2012', 'JPEGImages')),
    'coco': (dataset_fixtures.write_coco2014, coco2014, 'hml_coco2014', ''),
    'cub': (dataset_fixtures.write_cub, cub, 'hml_cub', os.path.join('CUB_200_2011', 'images')),
    'cub_tgz_layout': (lambda root: dataset_fixtures.write_cub(root, attributes_in_tgz_place=True),
                       cub, 'hml_cub', os.path.join('CUB_200_2011', 'images')),
    'nus_formatted': (dataset_fixtures.write_nus_wide, nus_wide, 'hml_nus_wide', None),
    'nus_official': (lambda root: dataset_fixtures.write_nus_wide(root, layout='official'),
                     nus_wide, 'hml_nus_wide', 'Flickr'),
}
NUM_LABELS = {
    'voc': 20,
    'coco': 80,
    'cub': 312,
    'cub_tgz_layout': 312,
    'nus_formatted': 81,
    'nus_official': 81
}


def image_path(case, root, filename):
  folder = CASES[case][3]
  if folder is None:  # NUS-WIDE formatted: the root, else Flickr/
    direct = os.path.join(root, filename)
    return direct if os.path.exists(direct) else os.path.join(root, 'Flickr', filename)
  return os.path.join(root, folder, filename)


def prepare(name, data_dir, manual_dir):
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


@pytest.mark.parametrize('case', list(CASES))
def test_read_split_matches_coles_procedure(case, tmp_path):
  writer, module, _, _ = CASES[case]
  written = writer(str(tmp_path))
  want, want_names = expected(case, str(tmp_path))
  for split in ('train', 'test'):
    filenames, labels, names = module.read_split(tmp_path, split)
    assert filenames == want[split][0]
    assert labels.dtype == np.uint8 and labels.shape == (len(filenames), NUM_LABELS[case])
    np.testing.assert_array_equal(labels, want[split][1])
    assert names == want_names
    assert len(filenames) >= 3
  # The planted special cases.
  if case == 'voc':
    train = module.read_split(tmp_path, 'train')[0]
    assert train == sorted(train) and '2008_000007.jpg' not in train
    assert '2010_000011.jpg' not in module.read_split(tmp_path, 'test')[0]
  if case == 'coco':
    train = module.read_split(tmp_path, 'train')[0]
    assert [int(f[-16:-4]) for f in train] == [10, 100, 25, 3, 9]  # 42: no annotation
  if case == 'nus_official':
    for split in ('train', 'test'):
      kept = module.read_split(tmp_path, split)[0]
      assert not set(kept) & set(written['missing'][split] + written['no_positive'][split])
      assert len(kept) == len(written['paths'][split]) - 2


@pytest.mark.parametrize('case', list(CASES))
def test_builder_stores_read_split_offline(case, tmp_path):
  writer, module, name, _ = CASES[case]
  manual = tmp_path / 'manual'
  writer(str(manual))
  prepare(name, tmp_path / 'data', manual)
  builder = tfds.builder(name, data_dir=str(tmp_path / 'data'))  # reloaded from disk
  for split in ('train', 'test'):
    filenames, labels, names = module.read_split(manual, split)
    assert builder.info.metadata['label_names'] == names
    assert builder.info.splits[split].num_examples == len(filenames)
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    raw = list(
        tfds.as_numpy(
            builder.as_dataset(split=split,
                               shuffle_files=False,
                               decoders={'image': tfds.decode.SkipDecoding()})))
    examples.sort(key=lambda e: e['index'])
    raw.sort(key=lambda e: e['index'])
    assert [e['index'] for e in examples] == list(range(len(filenames)))
    assert [e['filename'].decode() for e in examples] == filenames
    np.testing.assert_array_equal(np.stack([e['labels'] for e in examples]), labels)
    for example, encoded in zip(examples, raw):
      path = image_path(case, str(manual), example['filename'].decode())
      with Image.open(path) as source:
        assert example['image'].shape == (source.height, source.width, 3)
        assert example['image'].dtype == np.uint8
        with open(path, 'rb') as f:
          unchanged = encoded['image'] == f.read()
        assert unchanged == (source.mode == 'RGB')  # RGB JPEGs pass through, others converted
        if source.mode == 'L':
          gray = np.asarray(source, np.float64)
          assert np.abs(example['image'].astype(np.float64) - gray[..., None]).mean() < 8


# ------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize('module, expected_path', [
    (voc2012, 'VOCdevkit/VOC2012/ImageSets/Main/aeroplane_train.txt'),
    (coco2014, 'annotations/instances_train2014.json'),
    (cub, 'CUB_200_2011/images.txt'),
    (nus_wide, 'formatted_train_images.npy'),
])
def test_missing_files_name_the_expected_path(module, expected_path, tmp_path):
  with pytest.raises(FileNotFoundError, match='MANUAL_DOWNLOAD_INSTRUCTIONS') as error:
    module.read_split(tmp_path, 'train')
  assert str(tmp_path / expected_path) in str(error.value)


def test_missing_files_through_the_builder(tmp_path):
  manual = tmp_path / 'manual'
  dataset_fixtures.write_voc2012(str(manual))
  missing = manual / 'VOCdevkit/VOC2012/ImageSets/Main/cow_val.txt'
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    prepare('hml_voc2012', tmp_path / 'data', manual)


def test_missing_attribute_names_and_partial_nus_formats(tmp_path):
  dataset_fixtures.write_cub(str(tmp_path / 'cub'))
  os.remove(tmp_path / 'cub' / 'attributes.txt')
  with pytest.raises(FileNotFoundError, match='attributes.txt'):
    cub.read_split(tmp_path / 'cub', 'train')
  dataset_fixtures.write_nus_wide(str(tmp_path / 'nus'))
  missing = tmp_path / 'nus' / 'formatted_val_labels.npy'
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    nus_wide.read_split(tmp_path / 'nus', 'train')


def test_corrupt_and_missing_images_name_the_file(tmp_path):
  manual = tmp_path / 'manual'
  dataset_fixtures.write_voc2012(str(manual))
  corrupt = manual / 'VOCdevkit/VOC2012/JPEGImages/2008_000003.jpg'
  corrupt.write_bytes(np.random.RandomState(0).bytes(500))
  with pytest.raises(ValueError, match=re.escape(str(corrupt))):
    prepare('hml_voc2012', tmp_path / 'data', manual)
  # Truncated and missing files, straight through the image reader.
  good = manual / 'VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg'
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  for path in (truncated, tmp_path / 'absent.jpg'):
    with pytest.raises(ValueError, match=re.escape(str(path))):
      common.read_image(str(path))


def test_nus_image_in_neither_place_names_both(tmp_path):
  written = dataset_fixtures.write_nus_wide(str(tmp_path))
  filename = written['paths']['test'][0]
  os.remove(tmp_path / 'Flickr' / filename)
  with pytest.raises(ValueError) as error:
    nus_wide.resolve_image(tmp_path, filename)
  assert str(tmp_path / filename) in str(error.value)
  assert str(tmp_path / 'Flickr' / filename) in str(error.value)


def _replace_line(path, line_number, text):
  with open(path) as f:
    lines = f.readlines()
  lines[line_number - 1] = text + '\n'
  with open(path, 'w') as f:
    f.writelines(lines)


def test_malformed_label_lines_name_file_and_line(tmp_path):
  dataset_fixtures.write_voc2012(str(tmp_path / 'voc'))
  path = tmp_path / 'voc/VOCdevkit/VOC2012/ImageSets/Main/dog_train.txt'
  _replace_line(path, 3, '2009_000001  2')
  with pytest.raises(ValueError, match=re.escape(f'{path}, line 3')):
    voc2012.read_split(tmp_path / 'voc', 'train')

  dataset_fixtures.write_cub(str(tmp_path / 'cub'))
  path = tmp_path / 'cub/CUB_200_2011/attributes/image_attribute_labels.txt'
  _replace_line(path, 100, '1 100 yes 3 1.0')
  with pytest.raises(ValueError, match=re.escape(f'{path}, line 100')):
    cub.read_split(tmp_path / 'cub', 'test')

  dataset_fixtures.write_nus_wide(str(tmp_path / 'nus'), layout='official')
  path = tmp_path / 'nus/Groundtruth/TrainTestLabels/Labels_concept05_Test.txt'
  _replace_line(path, 2, '0.5')
  with pytest.raises(ValueError, match=re.escape(f'{path}, line 2')):
    nus_wide.read_split(tmp_path / 'nus', 'test')


def test_cub_refuses_missing_or_duplicated_attribute_lines(tmp_path):
  dataset_fixtures.write_cub(str(tmp_path))
  path = tmp_path / 'CUB_200_2011/attributes/image_attribute_labels.txt'
  original = path.read_text().splitlines(keepends=True)
  path.write_text(''.join(original[:50] + original[51:]))  # image 1, attribute 51 missing
  with pytest.raises(ValueError, match=r'image_id 1, attribute_id 51'):
    cub.read_split(tmp_path, 'train')
  path.write_text(''.join(original[:51] + [original[20]] + original[52:]))  # 21 twice, 52 lost
  with pytest.raises(ValueError, match=r'image_id 1, attribute_id 21\) appears more than once'):
    cub.read_split(tmp_path, 'train')


def test_coco_category_and_annotation_errors(tmp_path):
  manual = tmp_path / 'manual'
  dataset_fixtures.write_coco2014(str(manual))
  path = manual / 'annotations/instances_val2014.json'
  data = json.loads(path.read_text())
  data['categories'][5]['name'] = 'renamed'
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match='list different categories'):
    prepare('hml_coco2014', tmp_path / 'data', manual)
  data['annotations'][0]['category_id'] = 12  # one of the ids COCO does not use
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=re.escape(f'{path}: annotation 0')):
    coco2014.read_split(manual, 'test')


def test_coco_labels_follow_category_ids_whatever_the_file_order(tmp_path, caplog):
  dataset_fixtures.write_coco2014(str(tmp_path))
  filenames, labels, names = coco2014.read_split(tmp_path, 'train')
  path = tmp_path / 'annotations/instances_train2014.json'
  data = json.loads(path.read_text())
  data['categories'] = data['categories'][::-1]  # Cole et al. would index them in file order
  path.write_text(json.dumps(data))
  assert coco2014.read_split(tmp_path, 'train')[2] == names
  np.testing.assert_array_equal(coco2014.read_split(tmp_path, 'train')[1], labels)
  assert 'out of id order' in caplog.text


# ------------------------------------------------------------------------------------------------
# From the prepared TFDS data through Cole et al.'s protocol to one training epoch.

PAPER_CONFIGS = {
    'voc2012': ('configs.voc', dataset_fixtures.write_voc2012, voc2012),
    'coco2014': ('configs.coco', dataset_fixtures.write_coco2014, coco2014),
    'cub': ('configs.cub', dataset_fixtures.write_cub, cub),
    'nus_wide': ('configs.nus', dataset_fixtures.write_nus_wide, nus_wide)
}


def tiny_paper_config(name, manual_dir, data_dir, **overrides):
  config = importlib.import_module(PAPER_CONFIGS[name][0]).get_config()
  config.dataset.manual_dir, config.dataset.data_dir = str(manual_dir), str(data_dir)
  config.model, config.image_size = 'resnet_tiny', 32
  config.init_from = ''  # torchvision has no weights for the tiny model
  config.batch_size, config.eval_batch_size, config.num_epochs = 2, 4, 1
  config.dataset.shuffle_buffer, config.log_every_steps = 8, 1
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize('name', sorted(PAPER_CONFIGS))
@pytest.mark.slow
def test_protocol_of_each_fixture(tmp_path, name):
  _, write, module = PAPER_CONFIGS[name]
  write(tmp_path / 'manual')
  config = tiny_paper_config(name, tmp_path / 'manual', tmp_path / 'tfds')
  data = input_pipeline.load(config)
  # Steps 1-3 transcribed directly: the official label matrix in Cole et al.'s row order, one
  # observed positive per image with RandomState(1200) shuffling positives then negatives, and
  # the 80/20 split from RandomState(1200).permutation.
  _, full, names = module.read_split(str(tmp_path / 'manual'), 'train')
  _, test_labels, _ = module.read_split(str(tmp_path / 'manual'), 'test')
  rng = np.random.RandomState(1200)
  observed = np.zeros_like(full)
  for i, row in enumerate(full):
    positives = np.nonzero(row == 1)[0]
    rng.shuffle(positives)
    negatives = np.nonzero(row == 0)[0]
    rng.shuffle(negatives)
    observed[i, positives[:1]] = 1
  permutation = np.random.RandomState(1200).permutation(len(full))
  num_validation = int(np.round(0.2 * len(full)))
  train_rows = np.sort(permutation[:len(full) - num_validation])
  validation_rows = np.sort(permutation[-num_validation:])
  np.testing.assert_array_equal(data.train.labels, full[train_rows])
  np.testing.assert_array_equal(data.train.observed, observed[train_rows])
  np.testing.assert_array_equal(data.validation.labels, full[validation_rows])
  np.testing.assert_array_equal(data.test.labels, test_labels)
  assert data.label_names == list(names)


@pytest.mark.slow
def test_one_training_epoch_from_a_fixture(tmp_path):
  """After input_pipeline.load the four datasets take the same path: one of them trains."""
  _, write, module = PAPER_CONFIGS['voc2012']
  write(tmp_path / 'manual')
  config = tiny_paper_config('voc2012', tmp_path / 'manual', tmp_path / 'tfds')
  _, _, names = module.read_split(str(tmp_path / 'manual'), 'train')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert len(results['epochs']) == 1 and 0.0 <= results['test_map'] <= 100.0
  assert list(results['per_class_ap']) == list(names)


@pytest.mark.slow
def test_voc_config_as_shipped_starts_from_imagenet_weights_in_the_cache(
    tmp_path, monkeypatch, caplog):
  """configs/voc.py without any init_from flag: the ResNet-50 weights placed in the cache (here a
  random torchvision-layout ResNet-50 saved by torch under the real file's name, its digest
  patched in; the real file is checked the same way) initialize the backbone, with no network."""
  torch = pytest.importorskip('torch')
  cache = tmp_path / 'cache'
  os.makedirs(cache)
  monkeypatch.setenv('HML_JAX_CACHE', str(cache))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
  shapes = torchvision.expected_variables(models.get_backbone('resnet50'), (1, 64, 64, 3))
  rng = np.random.RandomState(0)
  state_dict = {}
  for path, shape in torchvision._flatten(shapes).items():  # pylint: disable=protected-access
    value = rng.normal(0, 0.05, shape.shape).astype(np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(3, 2, 0, 1)  # HWIO -> torchvision's OIHW
    elif path[-1] in ('scale', 'var'):
      value = np.abs(value) + 0.5
    name = torchvision._torchvision_name(path)  # pylint: disable=protected-access
    state_dict[name] = torch.from_numpy(np.ascontiguousarray(value))
  weights = torchvision.IMAGENET_WEIGHTS['resnet50']
  torch.save(state_dict, cache / weights.filename)
  digest = hashlib.sha256((cache / weights.filename).read_bytes()).hexdigest()
  monkeypatch.setitem(
      torchvision.IMAGENET_WEIGHTS, 'resnet50',
      torchvision.WeightsFile('http://127.0.0.1:9/unreachable/' + weights.filename, digest))

  dataset_fixtures.write_voc2012(tmp_path / 'manual')
  config = importlib.import_module('configs.voc').get_config()
  assert config.init_from == 'torchvision:resnet50' and config.model == 'resnet50'
  config.dataset.manual_dir = str(tmp_path / 'manual')
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.image_size = 64
  caplog.set_level('INFO')
  # What train_and_evaluate does before its first step (training a ResNet-50 here would add a
  # minute of compile time and test nothing more about the weights).
  from hml_jax import init_from  # pylint: disable=g-import-not-at-top
  init_from.fetch(config.init_from, config.model)
  method = methods.get_method(config.loss)
  model = models.create_model(config.model, method.head, 20)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config),
                                         model,
                                         method,
                                         jax.random.key(0), (64, 64, 3),
                                         np.zeros((4, 20), np.float32),
                                         backbone=init_from.initial_backbone(
                                             config.init_from, config.model, model, (64, 64, 3)))
  initialized = f'Backbone initialized from torchvision:resnet50 ({cache / weights.filename})'
  assert initialized in caplog.text
  assert 'starts from random weights' not in caplog.text
  np.testing.assert_array_equal(np.asarray(state.params['model']['backbone']['conv1']['kernel']),
                                state_dict['conv1.weight'].numpy().transpose(2, 3, 1, 0))
