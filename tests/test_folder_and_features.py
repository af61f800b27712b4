"""Your own images (folder + CSV) and features mode (.npz): labels, protocol, errors, training."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from hml_jax.configs import features as features_config
from hml_jax.configs import folder as folder_config
from hml_jax.data import labels as labels_lib
from hml_jax.datasets import folder
from hml_jax.datasets import registry
from hml_jax.tools import dataset_stats as stats
from hml_jax.state import train_state
from hml_jax.training import extract_features
from hml_jax.training import input_pipeline
from hml_jax.training import train
from tests.helpers import read_results

NAMES = ('cat', 'dog', 'car', 'tree')
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_ENV = {**os.environ, 'PYTHONPATH': PROJECT_ROOT, 'JAX_PLATFORMS': 'cpu'}


def write_folder(root, num_train=24, num_test=8, seed=0, test_csv=True, separator=' '):
  """Images of random sizes and formats plus train.csv / test.csv; returns the label lists."""
  rng = np.random.RandomState(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  written = {}
  for split, count in (('train', num_train), ('test', num_test)):
    rows = []
    for i in range(count):
      size = (int(rng.randint(20, 60)), int(rng.randint(20, 60)))
      mode, extension = [('RGB', 'jpg'), ('L', 'jpg'), ('RGB', 'png')][i % 3]
      pixels = rng.randint(0, 256, size + ((3,) if mode == 'RGB' else ()), dtype=np.uint8)
      filename = f'images/{split}_{i}.{extension}'
      Image.fromarray(pixels, mode).save(os.path.join(root, filename))
      labels = [name for name in NAMES if rng.rand() < 0.4] or [NAMES[i % len(NAMES)]]
      rows.append((filename, labels))
    written[split] = rows
  splits = ('train', 'test') if test_csv else ('train',)
  for split in splits:
    rows = written[split] if test_csv else written['train'] + written['test']
    with open(os.path.join(root, f'{split}.csv'), 'w') as f:
      f.write('filename,labels\n')
      for filename, labels in rows:
        f.write(f'{filename},{separator.join(labels)}\n')
  return written


def tiny_image_config(path, **overrides):
  config = folder_config.get_config()
  config.dataset.path = str(path)
  config.model, config.image_size = 'resnet_tiny', 32
  config.init_from = ''  # torchvision has no weights for the tiny model
  config.batch_size, config.eval_batch_size, config.num_epochs = 4, 8, 1
  config.log_every_steps = 2
  config.dataset.shuffle_buffer = 16
  for key, value in overrides.items():
    config[key] = value
  return config


def test_folder_labels_and_protocol_match_numpy(tmp_path):
  written = write_folder(tmp_path, separator='|')
  config = tiny_image_config(tmp_path)
  data = input_pipeline.load(config)
  names = sorted({n for rows in written.values() for _, labels in rows for n in labels})
  assert data.label_names == names
  full = np.array([[n in labels for n in names] for _, labels in written['train']], np.int32)
  observed = labels_lib.observe(full, 'single_positive', seed=1200)
  # Cole et al.'s split, transcribed: RandomState(1200).permutation, round(0.2 n) to validation.
  perm = np.random.RandomState(1200).permutation(len(full))
  num_validation = int(np.round(0.2 * len(full)))
  train_rows, validation_rows = np.sort(perm[:-num_validation]), np.sort(perm[-num_validation:])
  np.testing.assert_array_equal(data.train.labels, full[train_rows])
  np.testing.assert_array_equal(data.train.observed, observed[train_rows])
  np.testing.assert_array_equal(data.validation.labels, full[validation_rows])
  np.testing.assert_array_equal(data.validation.observed, full[validation_rows])
  assert len(data.test) == 8

  # The streamed epoch: every training image at most once, observed labels attached to the
  # right row, deterministic for (seed, epoch), a new order for the next epoch.
  batches = list(data.train.train_batches(4, seed=0, epoch=1))
  assert len(batches) == len(data.train) // 4
  rows = np.concatenate([b['indices'] for b in batches])
  assert len(set(rows)) == len(rows)
  for batch in batches:
    assert batch['images'].shape == (4, 32, 32, 3) and batch['images'].dtype == np.uint8
    np.testing.assert_array_equal(batch['labels'], data.train.observed[batch['indices']])
  again = list(data.train.train_batches(4, seed=0, epoch=1))
  for first, second in zip(batches, again):
    np.testing.assert_array_equal(first['images'], second['images'])
  other = np.concatenate([b['indices'] for b in data.train.train_batches(4, 0, 2)])
  assert not np.array_equal(rows, other)

  # Evaluation: every image once, padded, the image of row r is image r of the split.
  evaluated = list(data.test.eval_batches(3))
  assert sum(b['mask'].sum() for b in evaluated) == 8
  first = evaluated[0]
  path = os.path.join(tmp_path, written['test'][int(first['indices'][0])][0])
  # torchvision's Resize((32, 32)) on Cole et al.'s pil_loader: the default decoder's output.
  expected = np.asarray(Image.open(path).convert('RGB').resize((32, 32), Image.BILINEAR))
  np.testing.assert_array_equal(first['images'][0], expected)


def test_folder_without_test_csv_holds_out_a_seeded_test_split(tmp_path):
  write_folder(tmp_path, test_csv=False)
  data = input_pipeline.load(tiny_image_config(tmp_path))
  assert len(data.test) == int(np.round(0.2 * 32))
  assert len(data.train) + len(data.validation) == 32 - len(data.test)


@pytest.mark.slow
def test_folder_trains_one_epoch_and_saves_label_names(tmp_path):
  write_folder(tmp_path / 'data')
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_image_config(tmp_path / 'data'), str(workdir))
  results = read_results(workdir)
  assert len(results['epochs']) == 1 and 0.0 <= results['test_map'] <= 100.0
  with open(workdir / 'dataset.json') as f:
    info = json.load(f)
  assert info['label_names'] == sorted(NAMES) and info['example_shape'] == [32, 32, 3]
  assert set(results['per_class_ap']) == set(NAMES)
  _, _, state = train_state.load_trained_state(str(workdir))
  assert state.step == results['epochs'][-1]['step']

  # Its backbone's features of the official splits, in official order, train a head.
  arrays = extract_features.extract_to_file(str(workdir), str(tmp_path / 'features.npz'))
  assert arrays['train_features'].shape == (24, 16) and arrays['test_features'].shape == (8, 16)
  assert np.all(np.isfinite(arrays['train_features']))
  # Another decoder (also for a run saved before config.dataset.decoder existed): other pixels.
  other = extract_features.extract_to_file(str(workdir),
                                           str(tmp_path / 'tensorflow.npz'),
                                           dataset_overrides=('decoder=tensorflow',))
  assert other['train_features'].shape == arrays['train_features'].shape
  assert not np.array_equal(other['train_features'], arrays['train_features'])
  with pytest.raises(ValueError, match="config.dataset.decoder='opencv'"):
    extract_features.extract_to_file(str(workdir),
                                     str(tmp_path / 'x.npz'),
                                     dataset_overrides=('decoder=opencv',))
  written = {
      split: [labels for _, labels in rows]
      for split, rows in write_folder(tmp_path / 'again').items()
  }
  np.testing.assert_array_equal(arrays['train_labels'],
                                folder.label_matrix(written['train'], sorted(NAMES)))
  head = train.train_and_evaluate(
      features_config_for(tmp_path / 'features.npz', num_epochs=1, batch_size=4),
      str(tmp_path / 'head'))
  assert set(head['per_class_ap']) == set(NAMES)

  # The same through the command line.
  command = [
      sys.executable, '-m', 'hml_jax.extract_features', f'--workdir={workdir}',
      f'--output={tmp_path / "cli.npz"}', '--which=latest'
  ]
  subprocess.run(command, check=True, capture_output=True, env=CLI_ENV, cwd=PROJECT_ROOT)
  with np.load(tmp_path / 'cli.npz') as cli:
    np.testing.assert_array_equal(cli['train_labels'], arrays['train_labels'])
    assert cli['test_features'].shape == (8, 16)


@pytest.mark.slow
def test_stats_prints_the_table_1_row(tmp_path):
  written = write_folder(tmp_path)
  config = tiny_image_config(tmp_path)
  row = stats.table_row(registry.load_source(config.dataset), config)
  assert (row['labels'], row['train'], row['test']) == (4, 24, 8)
  assert row['positives_train'] == pytest.approx(
      np.mean([len(labels) for _, labels in written['train']]))
  assert (row['train_split'], row['validation_split']) == (19, 5)
  assert '| 4 | 24 | 8 |' in stats.format_row(row)
  output = subprocess.run([
      sys.executable, '-m', 'hml_jax.datasets.stats', '--config=configs/folder.py',
      f'--config.dataset.path={tmp_path}'
  ],
                          check=True,
                          capture_output=True,
                          text=True,
                          env=CLI_ENV,
                          cwd=PROJECT_ROOT).stdout
  assert '| 4 | 24 | 8 |' in output


@pytest.mark.parametrize('problem', [
    'missing_csv', 'missing_image', 'bad_header', 'commas', 'empty', 'corrupt', 'semicolons',
    'vector', 'duplicate', 'leak', 'one_bit_bmp'
])
def test_folder_errors_name_the_file(tmp_path, problem):
  write_folder(tmp_path)
  train_csv = tmp_path / 'train.csv'
  expected = {
      'missing_csv': 'train.csv does not exist',
      'missing_image': 'train_3.jpg',
      'bad_header': 'line 1 must be the header',
      'commas': 'line 2 has 4 columns',
      'empty': 'no rows after its header',
      'corrupt': 'train_0.jpg',
      'semicolons': 'train.csv line 3: labels field',
      'vector': 'looks like a 0/1 vector',
      'duplicate': 'lists images/train_0.jpg twice',
      'leak': 'in both',
      'one_bit_bmp': 'train_1.bmp'
  }[problem]
  rows = train_csv.read_text().split('\n')
  if problem == 'missing_csv':
    os.remove(train_csv)
  elif problem == 'missing_image':
    os.remove(tmp_path / 'images' / 'train_3.jpg')
  elif problem == 'bad_header':
    train_csv.write_text('file;labels\n' + train_csv.read_text().split('\n', 1)[1])
  elif problem == 'commas':
    train_csv.write_text('filename,labels\nimages/train_0.jpg,cat,dog,car\n')
  elif problem == 'empty':
    train_csv.write_text('filename,labels\n')
  elif problem == 'corrupt':
    (tmp_path / 'images' / 'train_0.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg at all')
  elif problem == 'semicolons':
    rows[2] = rows[2].split(',')[0] + ',cat;dog'
    train_csv.write_text('\n'.join(rows))
  elif problem == 'vector':
    train_csv.write_text(
        'filename,labels\nimages/train_0.jpg,0 1 0 1\nimages/train_1.jpg,1 0 0 0\n')
  elif problem == 'duplicate':
    train_csv.write_text('\n'.join(rows[:3] + [rows[1]] + rows[3:]))
  elif problem == 'leak':
    (tmp_path / 'test.csv').write_text((tmp_path / 'test.csv').read_text() + rows[1] + '\n')
  elif problem == 'one_bit_bmp':  # PIL reads it, TensorFlow's decoder does not
    Image.fromarray(np.eye(16, dtype=bool)).save(tmp_path / 'images' / 'train_1.bmp')
    rows[2] = 'images/train_1.bmp,cat'
    train_csv.write_text('\n'.join(rows))
  config = tiny_image_config(tmp_path)
  if problem == 'one_bit_bmp':
    config.dataset.decoder = 'tensorflow'
  with pytest.raises((ValueError, FileNotFoundError), match=expected):
    input_pipeline.load(config)


def test_folder_label_separators_and_spreadsheet_bom(tmp_path):
  write_folder(tmp_path)
  (tmp_path / 'train.csv').write_text(
      '\ufefffilename,labels\n' +
      ''.join(f'images/train_{i}.jpg,traffic light|stop sign\n' for i in range(0, 24, 3)) +
      ''.join(f'images/train_{i}.png,cat  dog\n' for i in range(2, 24, 3)),
      encoding='utf-8')
  data = input_pipeline.load(tiny_image_config(tmp_path))
  assert 'traffic light' in data.label_names and 'stop sign' in data.label_names
  assert 'cat' in data.label_names and 'traffic' not in data.label_names


@pytest.mark.slow
def test_resuming_on_other_data_is_refused(tmp_path):
  write_folder(tmp_path / 'data')
  config = tiny_image_config(tmp_path / 'data')
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = (tmp_path / 'data' / 'train.csv').read_text().split('\n')
  rows[1] = rows[1].split(',')[0] + ',tree'  # an edited label
  (tmp_path / 'data' / 'train.csv').write_text('\n'.join(rows))
  config.num_epochs = 2
  with pytest.raises(ValueError, match='data differs'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_unknown_dataset_name_is_not_downloaded(tmp_path):
  config = tiny_image_config(tmp_path)
  config.dataset.name = 'voc'  # a TFDS catalog name: would start a download
  with pytest.raises(ValueError, match="Unknown dataset 'voc'"):
    input_pipeline.load(config)


def test_folder_skip_corrupt_skips_and_counts(tmp_path, caplog):
  write_folder(tmp_path)
  (tmp_path / 'images' / 'train_0.jpg').write_bytes(b'garbage')
  # A truncated JPEG (header intact) must be caught too.
  good = (tmp_path / 'images' / 'train_3.jpg').read_bytes()
  (tmp_path / 'images' / 'train_3.jpg').write_bytes(good[:len(good) // 3])
  config = tiny_image_config(tmp_path)
  config.dataset.skip_corrupt = True
  with caplog.at_level('WARNING'):
    data = input_pipeline.load(config)
  assert len(data.train) + len(data.validation) == 22
  assert 'Skipped 2 corrupt image(s)' in caplog.text


def write_features(path,
                   num_train=400,
                   num_test=200,
                   dimensions=32,
                   num_labels=5,
                   seed=0,
                   validation=False):
  """Features where each label is a direction: learnable, so training must beat chance."""
  rng = np.random.RandomState(seed)
  directions = rng.randn(num_labels, dimensions)
  arrays = {}
  splits = (('train', num_train), ('test', num_test)) + ((('val', 100),) if validation else ())
  for split, count in splits:
    labels = (rng.rand(count, num_labels) < 0.3).astype(np.int32)
    labels[np.arange(count), rng.randint(0, num_labels, count)] = 1
    arrays[f'{split}_features'] = (labels @ directions + 0.3 * rng.randn(count, dimensions)).astype(
        np.float32)
    arrays[f'{split}_labels'] = labels
  arrays['label_names'] = np.array([f'label{j}' for j in range(num_labels)])
  np.savez(path, **arrays)
  return arrays


def features_config_for(path, **overrides):
  config = features_config.get_config()
  config.dataset.path = str(path)
  config.num_epochs = 5
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize('loss', ['hml', 'an', 'role', 'll_cp'])
def test_features_mode_trains_from_npz(tmp_path, loss):
  arrays = write_features(tmp_path / 'features.npz')
  workdir = tmp_path / loss
  results = train.train_and_evaluate(features_config_for(tmp_path / 'features.npz', loss=loss),
                                     str(workdir))
  assert results['test_map'] > 85.0, results['test_map']  # chance is about 40
  assert list(results['per_class_ap']) == [str(n) for n in arrays['label_names']]


def test_features_mode_protocol_and_own_validation(tmp_path):
  arrays = write_features(tmp_path / 'a.npz')
  data = input_pipeline.load(features_config_for(tmp_path / 'a.npz'))
  train_rows, validation_rows = labels_lib.validation_split(400, 1200, 0.2)
  np.testing.assert_array_equal(data.train.labels, arrays['train_labels'][train_rows])
  np.testing.assert_array_equal(
      data.train.observed,
      labels_lib.observe(arrays['train_labels'], 'single_positive', 1200)[train_rows])
  np.testing.assert_array_equal(data.validation.labels, arrays['train_labels'][validation_rows])
  arrays = write_features(tmp_path / 'b.npz', validation=True)
  data = input_pipeline.load(features_config_for(tmp_path / 'b.npz'))
  assert len(data.train) == 400 and len(data.validation) == 100
  np.testing.assert_array_equal(data.validation.labels, arrays['val_labels'])


def test_features_standardization_uses_training_rows_only(tmp_path):
  arrays = write_features(tmp_path / 'a.npz')
  config = features_config_for(tmp_path / 'a.npz')
  config.dataset.standardize = 'standardize'
  data = input_pipeline.load(config)
  train_rows, validation_rows = labels_lib.validation_split(400, 1200, 0.2)
  training = arrays['train_features'][train_rows].astype(np.float64)
  mean, std = training.mean(0), training.std(0)
  np.testing.assert_allclose(data.feature_statistics['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(data.feature_statistics['std'], std, rtol=1e-5)
  np.testing.assert_allclose(data.train.examples, (training - mean) / std, atol=1e-4)
  np.testing.assert_allclose(data.validation.examples,
                             (arrays['train_features'][validation_rows] - mean) / std,
                             atol=1e-4)
  np.testing.assert_allclose(data.test.examples, (arrays['test_features'] - mean) / std, atol=1e-4)
  np.testing.assert_allclose(data.train.examples.mean(0), 0, atol=1e-4)
  config.dataset.standardize = 'l2'
  data = input_pipeline.load(config)
  assert data.feature_statistics is None
  np.testing.assert_allclose(np.linalg.norm(data.test.examples, axis=1), 1, rtol=1e-5)
  config.dataset.standardize = 'whiten'
  with pytest.raises(ValueError, match="config.dataset.standardize='whiten'"):
    input_pipeline.load(config)


def test_features_standardization_is_saved_with_the_run(tmp_path):
  write_features(tmp_path / 'a.npz')
  config = features_config_for(tmp_path / 'a.npz', num_epochs=1)
  config.dataset.standardize = 'standardize'
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'feature_statistics.json').read_text())
  assert len(saved['mean']) == len(saved['std']) == 32
  assert results['test_map'] > 60


@pytest.mark.parametrize('problem, expected', [
    ('no_path', 'config.dataset.path is empty'),
    ('missing', 'does not exist'),
    ('missing_key', "lacks \\['test_labels'\\]"),
    ('rows', 'train_features has 400 rows but train_labels has 399'),
    ('nan', "'train_features' has a non-finite value in row 7"),
    ('labels', 'only 0 and 1'),
    ('soft_labels', "'train_labels' must hold only 0 and 1; found 0.7"),
    ('validation_labels', "'val_labels' must hold only 0 and 1; found -1"),
    ('empty_validation', "'val_features' is empty"),
])
def test_features_errors(tmp_path, problem, expected):
  path = tmp_path / 'f.npz'
  arrays = write_features(path)
  if problem == 'missing_key':
    arrays.pop('test_labels')
  elif problem == 'rows':
    arrays['train_labels'] = arrays['train_labels'][:-1]
  elif problem == 'nan':
    arrays['train_features'][7, 3] = np.nan
  elif problem == 'labels':
    arrays['test_labels'][2, 1] = 2
  elif problem == 'soft_labels':
    arrays['train_labels'] = arrays['train_labels'].astype(np.float64)
    arrays['train_labels'][3, 0] = 0.7
  elif problem == 'validation_labels':
    arrays['val_features'] = arrays['train_features'][:10]
    arrays['val_labels'] = arrays['train_labels'][:10].copy()
    arrays['val_labels'][4, 2] = -1
  elif problem == 'empty_validation':
    arrays['val_features'] = np.zeros((0, 32), np.float32)
    arrays['val_labels'] = np.zeros((0, 5), np.int32)
  np.savez(path, **arrays)
  config = features_config_for('' if problem == 'no_path' else tmp_path /
                               'nope.npz' if problem == 'missing' else path)
  with pytest.raises((ValueError, FileNotFoundError), match=expected):
    input_pipeline.load(config)


def test_folder_reads_every_colour_mode_as_rgb(tmp_path):
  """Grayscale, CMYK, RGBA, palette and 16-bit images become (H, W, 3) uint8 like the rest."""
  write_folder(tmp_path)
  rng = np.random.RandomState(1)
  rgb = Image.fromarray(rng.randint(0, 256, (40, 50, 3), dtype=np.uint8))
  rows = ['filename,labels']
  for i, (mode, extension) in enumerate([('CMYK', 'jpg'), ('RGBA', 'png'), ('P', 'png'),
                                         ('I;16', 'png'), ('LA', 'png'), ('L', 'jpg')] * 3):
    path = f'images/mode_{i}.{extension}'
    rgb.convert(mode).save(tmp_path / path)
    rows.append(f'{path},{NAMES[i % 4]}')
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  config = tiny_image_config(tmp_path)
  data = input_pipeline.load(config)
  batches = list(data.train.train_batches(4, seed=0, epoch=1))
  assert batches and all(b['images'].shape == (4, 32, 32, 3) for b in batches)
  evaluated = list(data.validation.eval_batches(8))
  assert sum(b['mask'].sum() for b in evaluated) == len(data.validation)
