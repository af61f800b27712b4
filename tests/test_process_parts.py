"""Each process reads only its part of a streamed split (splits.part_bounds, RecordReader).

Processes are simulated: readers and ImageSplit's methods take (process_index, process_count)
explicitly. The TFDS checks use the embedded builder prepared in four files, so that a part is a
proper subset of the files. tests/test_multihost.py runs two real processes.
"""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hml_jax import datasets
from hml_jax.configs import tiny
from hml_jax.data import splits
from hml_jax.datasets import folder
from hml_jax.training import input_pipeline

NUM_SHARDS = 4
BUILDER = 'composite_digits/tiny'  # 240 train and 80 test images


@pytest.mark.parametrize('count', [1, 2, 3])
def test_part_bounds_are_contiguous_disjoint_covering_and_even(count):
  for num_records in (0, 1, 2, 5, 7, 240, 241):
    bounds = [splits.part_bounds(num_records, p, count) for p in range(count)]
    # In process order the parts are consecutive ranges that together are 0..n-1 once each.
    positions = np.concatenate([np.arange(start, stop) for start, stop in bounds])
    np.testing.assert_array_equal(positions, np.arange(num_records))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first parts take the remainder
  expected = {1: [(0, 7)], 2: [(0, 4), (4, 7)], 3: [(0, 3), (3, 5), (5, 7)]}[count]
  assert [splits.part_bounds(7, p, count) for p in range(count)] == expected


def test_part_bounds_refuse_a_process_outside_the_count():
  with pytest.raises(ValueError, match='Process index 2 of 2 processes'):
    splits.part_bounds(10, 2, 2)
  with pytest.raises(ValueError, match='Process index 0 of 0 processes'):
    splits.part_bounds(10, 0, 0)


@pytest.mark.parametrize('count', [1, 2, 3])
def test_part_sizes_count_the_split_rows_of_each_part(count):
  rng = np.random.RandomState(count)
  storage = rng.permutation(50)  # official index of each stored record
  storage[rng.choice(50, 5, replace=False)] = -1  # records the reader drops
  rows_of_index = np.full(50, -1, np.int64)  # another split's images: -1
  members = rng.choice(50, 30, replace=False)
  rows_of_index[members] = np.arange(30)
  sizes = splits.part_sizes(storage, rows_of_index, count)
  expected = []
  for p in range(count):
    start, stop = splits.part_bounds(50, p, count)
    expected.append(sum(1 for i in storage[start:stop] if i >= 0 and rows_of_index[i] >= 0))
  assert sizes.tolist() == expected
  assert sizes.sum() == len(set(members) & set(storage[storage >= 0]))


@pytest.mark.parametrize('count', [1, 2, 3])
def test_folder_reader_opens_only_the_files_of_its_part(tmp_path, count):
  paths = []
  for i in range(7):
    path = tmp_path / f'image_{i}.jpg'
    path.write_bytes(f'contents of {i}'.encode())  # read_file does not decode
    paths.append(str(path))
  reader = folder.file_reader('seven files', paths)
  hidden = tmp_path / 'hidden'
  hidden.mkdir()
  seen = []
  for p in range(count):
    start, stop = splits.part_bounds(7, p, count)
    others = [path for i, path in enumerate(paths) if not start <= i < stop]
    for path in others:  # the other parts' files are gone while this process reads
      shutil.move(path, hidden / os.path.basename(path))
    for seed in (None, 5):
      records = list(tfds.as_numpy(reader(seed, p, count)))
      indices = [int(r['index']) for r in records]
      assert sorted(indices) == list(range(start, stop))
      assert all(r['image'] == f'contents of {r["index"]}'.encode() for r in records)
      if seed is not None:  # an exact permutation of the part, the same for the same seed
        assert indices == [int(r['index']) for r in tfds.as_numpy(reader(seed, p, count))]
        if count == 1:  # one process: the permutation of the whole list, as before
          assert indices == np.random.RandomState(seed).permutation(7).tolist()
    for path in others:
      shutil.move(hidden / os.path.basename(path), path)
    seen.extend(indices)
  assert sorted(seen) == list(range(7))


# ------------------------------------------------------------------------------------------------
# A TFDS builder stored in several files.


@pytest.fixture(scope='module')
def sharded_dir(tmp_path_factory):
  """A data_dir with the tiny embedded dataset written in NUM_SHARDS files per split."""
  directory = tmp_path_factory.mktemp('sharded_tfds')
  datasets.register_all()
  tfds.builder(BUILDER, data_dir=str(directory)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=NUM_SHARDS))
  return directory


def streamed_config(data_dir):
  config = tiny.get_config()
  config.dataset.data_dir = str(data_dir)
  config.dataset.in_memory = False  # streamed: ImageSplit over the TFDS records
  config.dataset.shuffle_buffer = 32
  return config


def read_part(records, seed, process_index, process_count):
  """(indices, encoded bytes) of every record the reader yields for that process."""
  yielded = list(tfds.as_numpy(records(seed, process_index, process_count)))
  return [int(r['index']) for r in yielded], sum(len(r['image']) for r in yielded)


@pytest.mark.parametrize('count', [2, 3])
def test_tfds_processes_read_disjoint_slices_from_their_own_files(sharded_dir, count):
  data = input_pipeline.load(streamed_config(sharded_dir))
  builder = tfds.builder(BUILDER, data_dir=str(sharded_dir))
  assert len(builder.info.splits['train'].shard_lengths) == NUM_SHARDS
  for split, records in (('train', data.train.records), ('test', data.test.records)):
    num_records = builder.info.splits[split].num_examples
    _, all_bytes = read_part(records, None, 0, 1)
    seen = []
    for p in range(count):
      start, stop = splits.part_bounds(num_records, p, count)
      indices, num_bytes = read_part(records, None, p, count)
      # The reader yields only this part's records: the stored records [start, stop) ...
      assert sorted(indices) == sorted(records.storage_indices[start:stop].tolist())
      assert len(indices) == stop - start <= -(-num_records // count)
      assert 0.7 / count < num_bytes / all_bytes < 1.3 / count
      # ... the same (shuffled: other order) records ...
      assert sorted(read_part(records, 11, p, count)[0]) == sorted(indices)
      # ... from the files and ranges that tfds.even_splits would read, a subset of the files.
      instructions = builder.info.splits[splits.tfds_subsplit(split, start, stop,
                                                              num_records)].file_instructions
      assert instructions == builder.info.splits[tfds.even_splits(split,
                                                                  count)[p]].file_instructions
      assert len({i.filename for i in instructions}) < NUM_SHARDS
      seen.extend(indices)
    assert sorted(seen) == list(range(num_records))  # disjoint and covering


@pytest.mark.parametrize('count,decoder', [(2, 'tensorflow'), (3, 'tensorflow'), (3, 'pil')])
def test_tfds_processes_run_equal_steps_and_evaluate_every_image_once(sharded_dir, count, decoder):
  config = streamed_config(sharded_dir)
  config.dataset.decoder = decoder
  data = input_pipeline.load(config)
  batch_size = 6 * count  # local batches of 6
  sizes = data.train.part_sizes(count)
  assert sizes.sum() == len(data.train) and len(set(sizes.tolist())) > 1  # unequal parts
  steps = [data.train.num_train_steps(batch_size, (p, count)) for p in range(count)]
  assert steps == [sizes.min() // 6] * count
  seen = []
  for p in range(count):
    start, stop = splits.part_bounds(len(data.train.records), p, count)
    part_rows = data.train.rows_of_index[data.train.records.storage_indices[start:stop]]
    batches = list(data.train.train_batches(batch_size, config.seed, 1, process=(p, count)))
    assert len(batches) == steps[p]
    rows = np.concatenate([b['indices'] for b in batches])
    assert all(len(b['indices']) == 6 for b in batches)
    assert set(rows.tolist()) <= set(part_rows[part_rows >= 0].tolist())
    assert len(set(rows.tolist())) == len(rows)
    for batch in batches:
      np.testing.assert_array_equal(batch['labels'], data.train.observed[batch['indices']])
    # Resuming mid-epoch gives the rest of the same epoch.
    resumed = list(
        data.train.train_batches(batch_size, config.seed, 1, start_step=2, process=(p, count)))
    assert len(resumed) == len(batches) - 2
    for got, expected in zip(resumed, batches[2:]):
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    seen.extend(rows.tolist())
  assert len(set(seen)) == len(seen)  # no image twice in an epoch across processes

  for split in (data.validation, data.test):
    per_process = [list(split.eval_batches(4 * count, process=(p, count))) for p in range(count)]
    assert len({len(batches) for batches in per_process}) == 1  # collective steps
    assert len(per_process[0]) == max(-(-s // 4) for s in split.part_sizes(count))
    times = np.zeros(len(split), np.int64)
    for batches in per_process:
      for batch in batches:
        assert len(batch['mask']) == 4
        np.add.at(times, batch['indices'][batch['mask']], 1)
    np.testing.assert_array_equal(times, 1)  # every image scored exactly once


def test_a_process_needs_only_the_files_of_its_part(sharded_dir, tmp_path):
  input_pipeline.load(streamed_config(sharded_dir))  # caches the labels beside the records
  copy = tmp_path / 'tfds'
  shutil.copytree(sharded_dir, copy)  # with the cached labels: no pass over every record
  builder = tfds.builder(BUILDER, data_dir=str(copy))
  needed = set()
  for split in ('train', 'test'):
    num_records = builder.info.splits[split].num_examples
    subsplit = splits.tfds_subsplit(split, *splits.part_bounds(num_records, 0, 2), num_records)
    needed |= {
        os.path.basename(i.filename) for i in builder.info.splits[subsplit].file_instructions
    }
  removed = [f for f in os.listdir(builder.data_dir) if '.tfrecord-' in f and f not in needed]
  assert len(removed) == NUM_SHARDS  # half the files of each split
  for name in removed:
    os.remove(os.path.join(builder.data_dir, name))
  config = streamed_config(copy)
  data = input_pipeline.load(config)
  batches = list(data.train.train_batches(16, config.seed, 1, process=(0, 2)))
  assert len(batches) == data.train.num_train_steps(16, (0, 2))
  assert sum(int(b['mask'].sum()) for b in data.test.eval_batches(8, process=(0, 2))) == 40
  with pytest.raises(tf.errors.NotFoundError):  # the other process's files are gone
    list(data.test.eval_batches(8, process=(1, 2)))
