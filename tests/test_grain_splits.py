"""Images streamed by grain from random-access records (hml_jax/data/grain_splits.py): the epoch
is a function of (seed, epoch) whatever the workers and processes, resuming at a step gives the
rest of the epoch, and evaluation scores every image once."""
import os
import subprocess
import sys

import numpy as np
import pytest

from hml_jax.data import grain_splits
from hml_jax.datasets import generated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 37


def records():
  """37 8x8 RGB PNGs whose pixels name their official index; stored in reverse order."""
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (NUM, 8, 8, 3)).astype(np.uint8)
  storage = np.arange(NUM)[::-1].copy()
  source = [{'image': generated.encode_png(images[i]), 'index': i} for i in storage]
  return grain_splits.IndexedRecords('test records', source, storage), images


def split(flip=True, workers=0):
  reader, images = records()
  rows_of_index = np.arange(NUM)
  labels = np.eye(NUM, 4, dtype=np.int32)
  return grain_splits.GrainImageSplit(reader, rows_of_index, labels, labels, 8, flip, 'pil',
                                      workers), images


def test_default_workers_leave_two_cores():
  assert grain_splits.default_workers(2) == 0
  assert grain_splits.default_workers(4) == 2
  assert grain_splits.default_workers(64) == 16


def test_an_epoch_is_a_seeded_permutation_with_its_flips():
  data, images = split()
  batches = list(data.train_batches(8, seed=3, epoch=2))
  assert len(batches) == data.num_train_steps(8) == NUM // 8
  rows = np.concatenate([b['indices'] for b in batches])
  assert len(set(rows)) == len(rows)
  flipped = 0
  for batch in batches:
    for image, row in zip(batch['images'], batch['indices']):
      if np.array_equal(image, images[row]):
        continue
      np.testing.assert_array_equal(image, images[row][:, ::-1])
      flipped += 1
    np.testing.assert_array_equal(batch['labels'], data.observed[batch['indices']])
  assert 0 < flipped < len(rows)
  again = list(data.train_batches(8, seed=3, epoch=2))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['images'], b['images'])
  other = np.concatenate([b['indices'] for b in data.train_batches(8, seed=3, epoch=3)])
  assert not np.array_equal(other, rows)


def test_resuming_at_a_step_gives_the_rest_of_the_epoch():
  data, _ = split()
  whole = list(data.train_batches(8, seed=0, epoch=1))
  resumed = list(data.train_batches(8, seed=0, epoch=1, start_step=2))
  assert len(resumed) == len(whole) - 2
  for a, b in zip(whole[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_processes_share_each_global_batch():
  data, _ = split()
  whole = list(data.train_batches(8, seed=1, epoch=1))
  parts = [list(data.train_batches(8, seed=1, epoch=1, process=(p, 2))) for p in range(2)]
  for step, batch in enumerate(whole):
    joined = np.concatenate([parts[p][step]['images'] for p in range(2)])
    np.testing.assert_array_equal(joined, batch['images'])


@pytest.mark.parametrize('count', [1, 2, 3])
def test_evaluation_scores_every_image_once_in_equal_steps(count):
  data, images = split(flip=False)
  per_process = [list(data.eval_batches(6, process=(p, count))) for p in range(count)]
  assert len({len(b) for b in per_process}) == 1
  times = np.zeros(NUM, np.int64)
  for batches in per_process:
    for batch in batches:
      assert len(batch['mask']) == 6 // count
      rows = batch['indices'][batch['mask']]
      np.add.at(times, rows, 1)
      np.testing.assert_array_equal(batch['images'][batch['mask']], images[rows])
  np.testing.assert_array_equal(times, 1)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
  data, _ = split()
  threaded = list(data.train_batches(8, seed=5, epoch=1))
  data.workers = 2
  in_workers = list(data.train_batches(8, seed=5, epoch=1))
  assert len(threaded) == len(in_workers)
  for a, b in zip(threaded, in_workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_a_streamed_run_of_a_generated_dataset_imports_no_tensorflow(tmp_path):
  """Prepared (array_record), streamed by grain, trained and evaluated: no TensorFlow."""
  code = ('import sys\nfrom hml_jax.configs import tiny\nfrom hml_jax.training import train\n'
          'config = tiny.get_config(); config.num_epochs = 1; config.dataset.in_memory = False\n'
          f'config.dataset.data_dir = {str(tmp_path / "tfds")!r}\n'
          f'train.train_and_evaluate(config, {str(tmp_path / "run")!r})\n'
          'print("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env={
                              **os.environ, 'PYTHONPATH': ROOT
                          },
                          capture_output=True,
                          text=True,
                          check=True)
  assert result.stdout.strip().splitlines()[-1] == 'False'
  assert any(
      name.endswith('.array_record-00000-of-00001')
      for name in os.listdir(tmp_path / 'tfds' / 'composite_digits' / 'tiny' / '1.1.0'))
