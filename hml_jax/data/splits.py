"""Batches from one split: in memory (ArraySplit) or streamed by tf.data (ImageSplit), and which
part of a split each process reads.

One interface (`Split.train_batches`, `Split.eval_batches`):
  - ArraySplit: small data held in memory (composite digits, glyphs, features). The order of an
    epoch is a fresh NumPy permutation of (seed, epoch).
  - ImageSplit: encoded images streamed by tf.data, decoded and resized (config.image_size)
    by config.dataset.decoder (hml_jax/data/decoders.py), flipped and batched in parallel. Shuffling,
    file order and flips are seeded by (seed, epoch), so a resumed run sees the batches an
    uninterrupted one would have seen.
With several processes (hosts), an ArraySplit's every process draws the same global batch and
keeps its rows; an ImageSplit's process reads only its own part of the files (`part_bounds`,
`RecordReader`), and jax.make_array_from_process_local_data assembles the global batch.
Images leave as uint8 (4x less to move to the accelerator than float32) and are normalized with
config.dataset.mean/std on the device; features leave as float32.
"""
import abc
import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np

from hml_jax.data import decoders
from hml_jax.runtime import errors

# tf.data's "let the runtime pick" value for parallelism and prefetch (tf.data.AUTOTUNE).
AUTOTUNE = -1


class Split(abc.ABC):
  """One split: labels (N, num_labels) 0/1 true labels; observed (N, num_labels) the labels
  training may use (equal to labels outside the training split); example_shape, the shape of one
  model input (H, W, C) image or (D,) feature vector."""
  labels: np.ndarray
  observed: np.ndarray
  example_shape: Tuple[int, ...]

  def __len__(self):
    return len(self.labels)

  def num_train_steps(self, batch_size: int) -> int:
    """Training drops the last incomplete batch (fixed shapes: one compilation)."""
    return len(self) // batch_size

  @abc.abstractmethod
  def train_batches(self,
                    batch_size: int,
                    seed: int,
                    epoch: int,
                    start_step: int = 0) -> Iterator[dict]:
    """num_train_steps(batch_size) batches, each this process's part of a global batch:
    {'images', 'labels' (observed), 'indices' (rows)}; from start_step on (the batches before it
    are the ones an uninterrupted epoch would have seen)."""

  @abc.abstractmethod
  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    """Every example once: {'images', 'indices' (rows), 'mask'}; the last batch is padded to
    batch_size and 'mask' marks the real examples (evaluation never drops an example)."""


def num_train_steps_per_epoch(split: Split, batch_size: int) -> int:
  """Train steps of one epoch, the same on every process (the steps are collective): the full
  batches of the split, or with several processes reading their own parts of a streamed split,
  the full local batches of the smallest part (ImageSplit.num_train_steps)."""
  return split.num_train_steps(batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
  """One integer per (seed, epoch) for tf.data's shuffles (distinct for epochs < 1,000,003)."""
  return seed * 1_000_003 + epoch


def local_part(batch: dict) -> dict:
  """This process's share of a global batch (the same on every process): rows
  [p * B / P, (p + 1) * B / P). sharding.shard_batch reassembles the global batch."""
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return batch
  size = len(next(iter(batch.values()))) // count
  return {key: value[index * size:(index + 1) * size] for key, value in batch.items()}


def pad_batch(batch: dict, batch_size: int) -> dict:
  """batch (rows of equal-length arrays, with 'indices') padded with zeros to batch_size rows,
  plus 'mask': True for the real rows."""
  real = len(batch['indices'])
  padded = {
      key: np.concatenate([value,
                           np.zeros((batch_size - real,) + value.shape[1:],
                                    value.dtype)]) for key, value in batch.items()
  }
  padded['mask'] = np.arange(batch_size) < real
  return padded


# ------------------------------------------------------------------------------------------------
# In memory.


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.RandomState) -> np.ndarray:
  """Translates each image by up to max_shift pixels in each direction (edge pixels repeat)."""
  if max_shift <= 0:
    return images
  size_y, size_x = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode='edge')
  offsets = rng.randint(0, 2 * max_shift + 1, size=(len(images), 2))
  return np.stack(
      [image[dy:dy + size_y, dx:dx + size_x] for image, (dy, dx) in zip(padded, offsets)])


class ArraySplit(Split):
  """Examples in memory: images (N, H, W, C) uint8 or features (N, D) float32. max_shift: the
  training batches' random translation of images, in pixels (config.augment_max_shift)."""

  def __init__(self,
               examples: np.ndarray,
               labels: np.ndarray,
               observed: np.ndarray,
               max_shift: int = 0):
    self.examples, self.labels, self.observed = examples, labels, observed
    self.example_shape = tuple(examples.shape[1:])
    self.max_shift = max_shift

  def train_batches(self, batch_size, seed, epoch, start_step=0):
    # The permutation and the augmentation depend only on (seed, epoch).
    rng = np.random.RandomState([seed, epoch])
    permutation = rng.permutation(len(self))
    is_image = self.examples.ndim == 4
    max_shift = self.max_shift if is_image else 0
    for step in range(num_train_steps_per_epoch(self, batch_size)):
      indices = np.sort(permutation[step * batch_size:(step + 1) * batch_size])
      if step < start_step:  # draw the skipped batch's shifts: the same random stream after it
        if max_shift > 0:
          rng.randint(0, 2 * max_shift + 1, size=(len(indices), 2))
        continue
      examples = self.examples[indices]
      if is_image:
        examples = random_shift(examples, max_shift, rng)
      # Every process draws the same global batch and keeps its share.
      yield local_part({
          'images': examples,
          'labels': self.observed[indices],
          'indices': indices.astype(np.int32)
      })

  def eval_batches(self, batch_size):
    for start in range(0, len(self), batch_size):
      stop = min(start + batch_size, len(self))
      yield local_part(
          pad_batch(
              {
                  'images': self.examples[start:stop],
                  'indices': np.arange(start, stop, dtype=np.int32)
              }, batch_size))


# ------------------------------------------------------------------------------------------------
# Streamed with tf.data.


def part_bounds(num_records: int, process_index: int, process_count: int) -> Tuple[int, int]:
  """[start, stop): the storage positions of the records that process process_index of
  process_count reads. Contiguous (so that a process opens only the files holding its records),
  disjoint, covering all num_records, sizes differing by at most one (the first
  num_records % process_count parts have one more): the rule of tfds.even_splits."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Process index {process_index} of {process_count} processes: expected '
                     '0 <= index < count.')
  size, extra = divmod(num_records, process_count)
  start = process_index * size + min(process_index, extra)
  return start, start + size + int(process_index < extra)


def part_sizes(storage_indices: np.ndarray, rows_of_index: np.ndarray,
               process_count: int) -> np.ndarray:
  """(process_count,) how many rows of a split each process's part holds.

  storage_indices: the official index of each record in storage order (-1: a record the reader
  drops); rows_of_index: official index -> the split's row (-1: another split, e.g. validation
  rows inside the official train split). Pure arithmetic on what the source read when it was
  built, so every process computes every process's size without communicating."""
  storage_indices = np.asarray(storage_indices, np.int64)
  kept = storage_indices >= 0
  in_split = np.zeros(len(storage_indices), np.int64)
  in_split[kept] = rows_of_index[storage_indices[kept]] >= 0
  before = np.concatenate([[0], np.cumsum(in_split)])  # before[k]: rows in positions [0, k)
  bounds = [part_bounds(len(storage_indices), p, process_count) for p in range(process_count)]
  return np.array([before[stop] - before[start] for start, stop in bounds], np.int64)


def tfds_subsplit(split: str, start: int, stop: int, num_records: int) -> str:
  """The TFDS split string of the records at storage positions [start, stop) of split (of
  num_records): its own name when that is all of it, else an absolute slice 'train[a:b]'."""
  if (start, stop) == (0, num_records):
    return split  # one process: exactly the reads of a whole split
  return f'{split}[{start}:{stop}]'


@dataclasses.dataclass(frozen=True)
class RecordReader:
  """The encoded images of one official split, read whole or one process's part.

  storage_indices[k]: the official index of the split's k-th record in storage order (TFDS's files
  concatenated, or a folder's file list), -1 for a record the reader drops (a catalog image
  without a positive label). read(shuffle_seed, start, stop) opens only the records at storage
  positions [start, stop) and returns a tf.data.Dataset of {'image': encoded bytes, 'index':
  official index} (dropped records left out), in a fixed order when shuffle_seed is None, else
  in an order that is a function of shuffle_seed. Calling the reader with
  (shuffle_seed, process_index, process_count) reads that process's part (`part_bounds`).
  """
  name: str  # for messages: the dataset and split
  read: Callable[[Optional[int], int, int], Any]  # -> tf.data.Dataset (TensorFlow is lazy)
  storage_indices: np.ndarray

  def __len__(self):
    return len(self.storage_indices)

  def __call__(self, shuffle_seed: Optional[int], process_index: int = 0, process_count: int = 1):
    start, stop = part_bounds(len(self), process_index, process_count)
    if process_count > 1:
      logging.info('Process %d of %d reads records [%d, %d) of the %d of %s.', process_index,
                   process_count, start, stop, len(self), self.name)
    if start == stop:  # more processes than records: nothing to read (TFDS refuses 'train[5:5]')
      return self.read(shuffle_seed, 0, 1).take(0)
    return self.read(shuffle_seed, start, stop)

  def part_indices(self, process_index: int, process_count: int) -> np.ndarray:
    """The official indices (and -1s) of the records that process's part holds."""
    start, stop = part_bounds(len(self), process_index, process_count)
    return self.storage_indices[start:stop]


def _process(process: Optional[Tuple[int, int]]) -> Tuple[int, int]:
  """(process_index, process_count): the given pair (tests simulate processes with it), else
  this process's."""
  if process is not None:
    return process
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


class ImageSplit(Split):
  """Encoded images read by `records`; rows_of_index maps an official index to this split's row
  (-1: the image belongs to another split, e.g. validation vs. train).

  With several processes, each reads only its part of the official split (`part_bounds`) and
  keeps this split's rows of it: the parts hold about as many of them, not exactly (the other
  split's rows fall unevenly), so every process runs the train steps of the smallest part and
  the eval batches of the largest, padding. One process reads everything as it always did. A
  global batch is then this process's next local batch next to the others': which images share
  a global batch depends on the number of processes (an ArraySplit's do not).
  """

  def __init__(self,
               records: RecordReader,
               rows_of_index: np.ndarray,
               labels: np.ndarray,
               observed: np.ndarray,
               image_size: int,
               flip: bool,
               shuffle_buffer: int,
               decoder: str,
               parallel_calls: int = AUTOTUNE,
               exact_shuffle: bool = False):
    self.records, self.rows_of_index = records, rows_of_index.astype(np.int64)
    self.decoder = decoders.check_decoder(decoder)
    self.labels, self.observed = labels, observed
    self.image_size, self.flip = image_size, flip
    self.shuffle_buffer, self.parallel_calls = shuffle_buffer, parallel_calls
    # True when records(seed) is already a uniform permutation (a folder of files): no buffer.
    self.exact_shuffle = exact_shuffle
    self.example_shape = (image_size, image_size, 3)
    self._part_sizes = {}  # process_count -> part_sizes

  def part_sizes(self, process_count: int) -> np.ndarray:
    """How many of this split's images each of process_count processes reads."""
    if process_count not in self._part_sizes:
      sizes = part_sizes(self.records.storage_indices, self.rows_of_index, process_count)
      if sizes.sum() != len(self):
        raise errors.InvalidInputError(
            f'The records of {self.records.name} hold {sizes.sum()} of the {len(self)} images '
            'of this split: the stored record order and the label matrix disagree. Delete the '
            "cached labels next to the prepared data (hml_*) so that they are read again.")
      self._part_sizes[process_count] = sizes
    return self._part_sizes[process_count]

  def num_train_steps(self, batch_size: int, process: Optional[Tuple[int, int]] = None) -> int:
    """Full local batches of the smallest part: no process runs out of images."""
    _, count = _process(process)
    return int(self.part_sizes(count).min()) // (batch_size // count)

  def _rows(self, shuffle_seed, process_index, process_count):
    """This split's records as {'image', 'row'}, of this process's part only."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    rows_of_index = tf.constant(self.rows_of_index)
    dataset = self.records(shuffle_seed, process_index, process_count).map(lambda record: {
        'image': record['image'],
        'row': tf.gather(rows_of_index, record['index'])
    })
    return dataset.filter(lambda record: record['row'] >= 0)

  def dataset(self,
              batch_size: int,
              seed: int,
              epoch: int,
              start_step: int = 0,
              process: Optional[Tuple[int, int]] = None):
    """The tf.data pipeline of one training epoch from start_step on (exposed for the throughput
    benchmark); process: (index, count), this process's by default."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    process_index, process_count = _process(process)
    shuffle_seed = epoch_seed(seed, epoch)
    dataset = self._rows(shuffle_seed, process_index, process_count)
    if not self.exact_shuffle:
      # Files come in a seeded order; the buffer mixes examples across files. Its size bounds the
      # memory of encoded images held (about 150 kB each for COCO).
      dataset = dataset.shuffle(min(self.shuffle_buffer, len(self)),
                                seed=shuffle_seed,
                                reshuffle_each_iteration=False)
    local_batch = batch_size // process_count
    # Resuming mid-epoch: drop the records of the steps already done, before any decoding.
    dataset = dataset.skip(start_step * local_batch)
    seed = tf.constant(shuffle_seed, tf.int64)
    flip = self.flip
    dataset = dataset.map(lambda record: dict(
        record, mirror=decoders.mirror_decision(tf.stack([seed, record['row']]))
        if flip else False))
    # Every process runs the same number of steps (the parts differ by a few images).
    steps = self.num_train_steps(batch_size, (process_index, process_count))
    dataset = self._decoded_batches(dataset, local_batch, steps - start_step)
    return dataset.prefetch(AUTOTUNE)

  def _decoded_batches(self, records, batch_size: int, num_batches: Optional[int]):
    """records {'image': encoded, 'row', 'mirror'} -> batches {'images' (B, S, S, 3) uint8,
    'indices' (B,) int32}, in order, in parallel. num_batches: full batches only, this many; None:
    all, the last one partial.

    'tensorflow' decodes image by image, then batches. 'pil' batches the encoded images and
    decodes each batch in one Python call: a tf.numpy_function call costs about 0.15 ms, which
    per image would come out of one core's worth of GIL shared by all of this process's
    threads. parallel_calls counts batches in flight then, not images."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    image_size = self.image_size
    full_batches = num_batches is not None
    # Parallel, but deterministic: the batch order must not depend on thread timing.
    parallel = dict(num_parallel_calls=self.parallel_calls, deterministic=True)
    if self.decoder == 'tensorflow':

      def decode(record):
        image = decoders.decode_and_resize_with_tensorflow(record['image'], image_size)
        image = tf.cond(record['mirror'], lambda: tf.reverse(image, [1]), lambda: image)
        return {'images': image, 'indices': tf.cast(record['row'], tf.int32)}

      batches = records.map(decode, **parallel).batch(batch_size, drop_remainder=full_batches)
      return batches.take(num_batches) if full_batches else batches

    def decode_batch(batch):
      images = tf.numpy_function(lambda encoded, mirror, rows: decoders.decode_batch_with_pil(
          encoded, mirror, rows, image_size), [batch['image'], batch['mirror'], batch['row']],
                                 tf.uint8,
                                 stateful=False)
      images.set_shape((batch_size if full_batches else None, image_size, image_size, 3))
      return {'images': images, 'indices': tf.cast(batch['row'], tf.int32)}

    batches = records.batch(batch_size, drop_remainder=full_batches)
    if full_batches:
      batches = batches.take(num_batches)  # before decoding: none is decoded in vain
    return batches.map(decode_batch, **parallel)

  def train_batches(self, batch_size, seed, epoch, start_step=0, process=None):
    for batch in self.dataset(batch_size, seed, epoch, start_step, process).as_numpy_iterator():
      batch['labels'] = self.observed[batch['indices']]
      yield batch

  def eval_batches(self, batch_size, process=None):
    """This process's part of each global batch: its own images, padded, and as many batches on
    every process (the eval step is collective): those of the largest part."""
    process_index, process_count = _process(process)
    local_batch = batch_size // process_count
    records = self._rows(None, process_index,
                         process_count).map(lambda record: dict(record, mirror=False))
    num_batches = int(max(-(-size // local_batch) for size in self.part_sizes(process_count)))
    emitted = 0
    dataset = self._decoded_batches(records, local_batch, num_batches=None)
    for batch in dataset.prefetch(AUTOTUNE).as_numpy_iterator():
      emitted += 1
      yield pad_batch(batch, local_batch)
    empty = {
        'images': np.zeros((0,) + self.example_shape, np.uint8),
        'indices': np.zeros((0,), np.int32)
    }
    for _ in range(num_batches - emitted):
      yield pad_batch(empty, local_batch)
