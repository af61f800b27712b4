"""Images streamed from random-access records (TFDS's array_record files through tfds.data_source)
by grain, without TensorFlow.

Every epoch is a global permutation of the split's rows drawn from (seed, epoch), as an
ArraySplit's, with the left-right flips drawn from the same stream; a global batch is the same
whatever the number of processes, and each process reads and decodes only its share of it (the
rows [p * B / P, (p + 1) * B / P) of the batch, as splits.local_part keeps). A batch is a pure
function of (seed, epoch, step), decoded in grain worker processes (config.dataset.workers), so
the batches do not depend on the number of workers, and a run resumed at step k of an epoch
reads exactly the batches from k on (a MapDataset's iterator state is its position: the
checkpoint's count of the epoch's steps done).
"""
import dataclasses
import os
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np

from hml_jax.data import decoders
from hml_jax.data import splits


@dataclasses.dataclass(frozen=True)
class IndexedRecords:
  """The encoded images of one official split, by storage position: source[position] is a record
  {'image': encoded bytes, ...} (a tfds data source with the image undecoded);
  storage_indices[position] is its official index."""
  name: str  # for messages: the dataset and split
  source: Any
  storage_indices: np.ndarray

  def __len__(self):
    return len(self.storage_indices)

  def encoded(self, position: int) -> bytes:
    return self.source[int(position)]['image']


def default_workers(cpu_count: Optional[int] = None) -> int:
  """Decoding processes for config.dataset.workers = -1: the cores beyond two (one for the
  training process, one for its input thread), at most 16; none on a 2-core machine, where a
  worker process only adds its start-up."""
  cpu_count = cpu_count or os.cpu_count() or 1
  return int(min(16, max(0, cpu_count - 2)))


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
  """plan (rows, mirror) -> {'images' (B, S, S, 3) uint8, 'indices' (B,) int32}: the rows'
  images decoded and resized by the configured decoder, mirrored where asked. Picklable: grain
  sends it to its worker processes."""
  records: IndexedRecords
  position_of_row: np.ndarray
  image_size: int
  decoder: str
  max_pixels: int

  def __call__(self, plan: Tuple[np.ndarray, np.ndarray]) -> dict:
    rows, mirror = plan
    encoded = np.array([self.records.encoded(self.position_of_row[row]) for row in rows],
                       dtype=object)
    if self.decoder == 'pil':
      images = decoders.decode_batch_with_pil(encoded, mirror, rows, self.image_size,
                                              self.max_pixels)
    else:
      images = np.empty((len(rows), self.image_size, self.image_size, 3), np.uint8)
      for i, data in enumerate(encoded):
        image = np.asarray(decoders.decode_and_resize_with_tensorflow(data, self.image_size))
        images[i] = image[:, ::-1] if mirror[i] else image
    return {'images': images, 'indices': np.asarray(rows, np.int32)}


def _batches(plans: Sequence[Tuple[np.ndarray, np.ndarray]], decode: DecodeBatch,
             workers: int) -> Iterator[dict]:
  """The decoded batches of plans, in order: in `workers` grain processes, or (0) in a grain
  thread of this process."""
  if not plans:
    return iter(())
  import grain  # pylint: disable=g-import-not-at-top
  dataset = grain.MapDataset.source(list(plans)).map(decode)
  if workers <= 0:
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # grain's workers read an absl flag (outside a command line)
    flags.FLAGS.mark_as_parsed()
  return iter(
      dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers)))


class GrainImageSplit(splits.Split):
  """Encoded images of records; rows_of_index maps an official index to this split's row (-1:
  the image belongs to another split, e.g. validation vs. train)."""

  def __init__(self,
               records: IndexedRecords,
               rows_of_index: np.ndarray,
               labels: np.ndarray,
               observed: np.ndarray,
               image_size: int,
               flip: bool,
               decoder: str,
               workers: int = 0,
               max_pixels: int = decoders.DEFAULT_MAX_IMAGE_PIXELS):
    self.records, self.labels, self.observed = records, labels, observed
    self.image_size, self.flip = image_size, flip
    self.decoder = decoders.check_decoder(decoder)
    self.workers = default_workers() if workers < 0 else workers
    self.example_shape = (image_size, image_size, 3)
    rows = np.asarray(rows_of_index, np.int64)[np.asarray(records.storage_indices, np.int64)]
    position_of_row = np.full(len(labels), -1, np.int64)
    position_of_row[rows[rows >= 0]] = np.nonzero(rows >= 0)[0]
    if np.any(position_of_row < 0):
      raise ValueError(f'The records of {records.name} lack {int(np.sum(position_of_row < 0))} '
                       'images of this split: delete the prepared data so that it is made again.')
    self.decode = DecodeBatch(records, position_of_row, image_size, self.decoder, max_pixels)

  def num_train_steps(self, batch_size: int, process: Optional[Tuple[int, int]] = None) -> int:
    """The full global batches: the same for every number of processes."""
    del process
    return len(self) // batch_size

  def train_plans(self, batch_size, seed, epoch, start_step=0, process=None):
    """[(rows, mirror)] of this process's share of each global batch from start_step on."""
    index, count = splits._process(process)  # pylint: disable=protected-access
    rng = np.random.RandomState([seed, epoch])
    permutation = rng.permutation(len(self))
    mirror = rng.uniform(size=len(self)) < 0.5 if self.flip else np.zeros(len(self), bool)
    share = batch_size // count
    plans = []
    for step in range(start_step, self.num_train_steps(batch_size)):
      rows = np.sort(permutation[step * batch_size:(step + 1) * batch_size])
      rows = rows[index * share:(index + 1) * share]
      plans.append((rows, mirror[rows]))
    return plans

  def train_batches(self, batch_size, seed, epoch, start_step=0, process=None):
    plans = self.train_plans(batch_size, seed, epoch, start_step, process)
    for batch in _batches(plans, self.decode, self.workers):
      batch['labels'] = self.observed[batch['indices']]
      yield batch

  def eval_batches(self, batch_size, process=None):
    """This process's share of each global batch of rows 0..N-1, padded (mask), as many on
    every process."""
    index, count = splits._process(process)  # pylint: disable=protected-access
    share = batch_size // count
    plans = []
    for start in range(0, len(self), batch_size):
      rows = np.arange(start, min(start + batch_size, len(self)))
      rows = rows[index * share:(index + 1) * share]
      plans.append((rows, np.zeros(len(rows), bool)))
    decoded = _batches([plan for plan in plans if len(plan[0])], self.decode, self.workers)
    empty = {
        'images': np.zeros((0,) + self.example_shape, np.uint8),
        'indices': np.zeros((0,), np.int32)
    }
    for rows, _ in plans:  # a share past the split's end (the last batch) is all padding
      yield splits.pad_batch(next(decoded) if len(rows) else empty, share)
