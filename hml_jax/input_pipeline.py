"""Data for training and evaluation: a source -> label matrices -> Cole et al.'s protocol -> batches.

Three kinds of source (config.dataset.name):
  - a TFDS builder: the embedded composite_digits, the paper's hml_voc2012 / hml_coco2014 /
    hml_cub / hml_nus_wide (hml_jax/datasets/, from the original files in TFDS's manual_dir);
  - 'folder': your own images plus CSV files (hml_jax/datasets/folder.py);
  - 'features': precomputed features in an .npz (Cole et al.'s linear_fixed_features).

Whatever the source, the protocol is the same (`apply_protocol`): observed labels are drawn for
the whole official train split (labels.observe), then 20% of it becomes validation, scored with
full labels like the test split.

Two ways to read examples, one interface (`Split.train_batches`, `Split.eval_batches`):
  - ArraySplit: small data held in memory (composite digits, features). The order of an epoch is
    a fresh NumPy permutation of (seed, epoch).
  - ImageSplit: encoded images streamed by tf.data, decoded and resized (config.image_size)
    by config.dataset.decoder (DECODERS), flipped and batched in parallel. Shuffling, file
    order and flips are seeded by (seed, epoch), so a resumed run sees the batches an
    uninterrupted one would have seen.
With several processes (hosts), an ArraySplit's every process draws the same global batch and
keeps its rows; an ImageSplit's process reads only its own part of the files (`part_bounds`,
`RecordReader`), and jax.make_array_from_process_local_data assembles the global batch.
Images leave the pipeline as uint8 (4x less to move to the accelerator than float32) and are
normalized with config.dataset.mean/std on the device; features leave it as float32, unchanged.
"""
import abc
import dataclasses
import io
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from hml_jax import labels as labels_lib

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
  def train_batches(self, batch_size: int, seed: int, epoch: int, config,
                    start_step: int = 0) -> Iterator[dict]:
    """num_train_steps(batch_size) batches, each this process's part of a global batch:
    {'images', 'labels' (observed), 'indices' (rows)}; from start_step on (the batches before it
    are the ones an uninterrupted epoch would have seen)."""

  @abc.abstractmethod
  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    """Every example once: {'images', 'indices' (rows), 'mask'}; the last batch is padded to
    batch_size and 'mask' marks the real examples (evaluation never drops an example)."""


@dataclasses.dataclass
class Data:
  train: Split
  validation: Split
  test: Split
  label_names: List[str]
  # Features mode with config.dataset.standardize='standardize': the training rows' per-dimension
  # {'mean', 'std'} (D,) that every split was standardized with (saved with the run).
  feature_statistics: Optional[Dict[str, np.ndarray]] = None


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
  padded = {key: np.concatenate([value, np.zeros((batch_size - real,) + value.shape[1:],
                                                  value.dtype)])
            for key, value in batch.items()}
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
  return np.stack([image[dy:dy + size_y, dx:dx + size_x]
                   for image, (dy, dx) in zip(padded, offsets)])


class ArraySplit(Split):
  """Examples in memory: images (N, H, W, C) uint8 or features (N, D) float32."""

  def __init__(self, examples: np.ndarray, labels: np.ndarray, observed: np.ndarray):
    self.examples, self.labels, self.observed = examples, labels, observed
    self.example_shape = tuple(examples.shape[1:])

  def train_batches(self, batch_size, seed, epoch, config, start_step=0):
    # The permutation and the augmentation depend only on (seed, epoch).
    rng = np.random.RandomState([seed, epoch])
    permutation = rng.permutation(len(self))
    is_image = self.examples.ndim == 4
    max_shift = config.get('augment_max_shift', 0) if is_image else 0
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
      yield local_part({'images': examples, 'labels': self.observed[indices],
                        'indices': indices.astype(np.int32)})

  def eval_batches(self, batch_size):
    for start in range(0, len(self), batch_size):
      stop = min(start + batch_size, len(self))
      yield local_part(pad_batch({'images': self.examples[start:stop],
                                   'indices': np.arange(start, stop, dtype=np.int32)},
                                  batch_size))


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

  def __call__(self, shuffle_seed: Optional[int], process_index: int = 0,
               process_count: int = 1):
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


# How encoded images become (image_size, image_size, 3) uint8 arrays (config.dataset.decoder):
#   'pil': PIL's decode and resize, exactly what Cole et al.'s loader and torchvision's
#     Resize((size, size)) compute, and 1.6-2.5x faster per core than 'tensorflow'
#     (docs/performance_notes.md, "Input pipeline"). Runs as Python in tf.data's threads: PIL
#     releases the GIL while it decodes and resizes, and holds it for 0.07-0.13 ms per image
#     (uncontended; scripts/benchmark_decode.py).
#   'tensorflow': tf.io.decode_image + tf.image.resize(antialias=True), in TensorFlow's C++
#     threads (no GIL): slower per core, but free of the GIL's bound on a host with many cores
#     per process. Its resize is within 1 grey level of PIL's; its JPEG decoder rounds
#     differently (about 1 level on average).
DECODERS = ('pil', 'tensorflow')
# 16-bit images: PIL's convert('RGB') (and so torchvision's loader) clips them at 255; they are
# scaled to 8 bits first, as TensorFlow's decoder does.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def check_decoder(decoder: str) -> str:
  if decoder not in DECODERS:
    raise ValueError(f'config.dataset.decoder={decoder!r} is not one of {DECODERS}.')
  return decoder


def image_decoder(dataset_config) -> str:
  """config.dataset.decoder, checked; a config without the key (saved before it existed) means
  the decoder that runs had then."""
  return check_decoder(dataset_config.get('decoder', 'pil'))


def decode_and_resize_with_pil(encoded: bytes, image_size: int, channels: int = 3) -> np.ndarray:
  """Encoded image bytes (any format PIL reads) -> (image_size, image_size, channels) uint8.

  Exactly torchvision's `Resize((image_size, image_size))(Image.open(f).convert('RGB'))`, Cole et
  al.'s preprocessing: PIL's bilinear filter, which widens with the scale factor when shrinking
  (antialiasing). 16-bit images are scaled to 8 bits first (SIXTEEN_BIT_MODES). channels=1
  converts to PIL's 'L' (ITU-R 601-2 luma) instead of 'RGB'. Raises ValueError for bytes that
  do not decode."""
  mode = {1: 'L', 3: 'RGB'}[channels]
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      if image.mode in SIXTEEN_BIT_MODES:
        sixteen_bit = np.asarray(image, np.float64)
        image = Image.fromarray(np.round(sixteen_bit * (255.0 / 65535.0)).astype(np.uint8))
      if image.mode != mode:  # convert() copies even when the mode is already right
        image = image.convert(mode)
      image = image.resize((image_size, image_size), Image.BILINEAR)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise ValueError(f'not a readable image ({type(error).__name__}: {error})') from error
  array = np.asarray(image)
  return array[:, :, None] if channels == 1 else array


def decode_batch_with_pil(encoded: np.ndarray, mirror: np.ndarray, rows: np.ndarray,
                          image_size: int) -> np.ndarray:
  """(B,) encoded images (bytes), (B,) bool, (B,) their rows in the split -> (B, image_size,
  image_size, 3) uint8: each image through decode_and_resize_with_pil, mirrored left-right
  where `mirror`. An image that does not decode raises ValueError naming its row."""
  images = np.empty((len(encoded), image_size, image_size, 3), np.uint8)
  for i, (image_bytes, mirrored) in enumerate(zip(encoded, mirror)):
    try:
      image = decode_and_resize_with_pil(image_bytes, image_size)
    except ValueError as error:
      raise ValueError(f'Image of row {rows[i]} of this split: {error}') from error
    images[i] = image[:, ::-1] if mirrored else image
  return images


def mirror_decision(seed):
  """Whether to flip an image left-right, from a (2,) int64 stateless seed: the rule of
  tf.image.stateless_random_flip_left_right (a uniform draw below 0.5), so that both decoders
  flip the same images."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=1.0) < 0.5


def decode_and_resize_with_tensorflow(encoded, image_size: int, channels: int = 3):
  """Encoded JPEG/PNG/GIF/BMP bytes (a scalar tf.string) -> (image_size, image_size, channels)
  uint8 tensor: TensorFlow's decoder and antialiased bilinear resize, rounded back to uint8
  (normalization happens on the device)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image = tf.image.resize(image, (image_size, image_size), method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


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

  def __init__(self, records: RecordReader, rows_of_index: np.ndarray, labels: np.ndarray,
               observed: np.ndarray, image_size: int, flip: bool, shuffle_buffer: int,
               decoder: str, parallel_calls: int = AUTOTUNE, exact_shuffle: bool = False):
    self.records, self.rows_of_index = records, rows_of_index.astype(np.int64)
    self.decoder = check_decoder(decoder)
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
        raise ValueError(
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
    dataset = self.records(shuffle_seed, process_index, process_count).map(
        lambda record: {'image': record['image'],
                        'row': tf.gather(rows_of_index, record['index'])})
    return dataset.filter(lambda record: record['row'] >= 0)

  def dataset(self, batch_size: int, seed: int, epoch: int, start_step: int = 0,
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
      dataset = dataset.shuffle(min(self.shuffle_buffer, len(self)), seed=shuffle_seed,
                                reshuffle_each_iteration=False)
    local_batch = batch_size // process_count
    # Resuming mid-epoch: drop the records of the steps already done, before any decoding.
    dataset = dataset.skip(start_step * local_batch)
    seed = tf.constant(shuffle_seed, tf.int64)
    flip = self.flip
    dataset = dataset.map(lambda record: dict(
        record, mirror=mirror_decision(tf.stack([seed, record['row']])) if flip else False))
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
        image = decode_and_resize_with_tensorflow(record['image'], image_size)
        image = tf.cond(record['mirror'], lambda: tf.reverse(image, [1]), lambda: image)
        return {'images': image, 'indices': tf.cast(record['row'], tf.int32)}
      batches = records.map(decode, **parallel).batch(batch_size, drop_remainder=full_batches)
      return batches.take(num_batches) if full_batches else batches

    def decode_batch(batch):
      images = tf.numpy_function(
          lambda encoded, mirror, rows: decode_batch_with_pil(encoded, mirror, rows, image_size),
          [batch['image'], batch['mirror'], batch['row']], tf.uint8, stateful=False)
      images.set_shape((batch_size if full_batches else None, image_size, image_size, 3))
      return {'images': images, 'indices': tf.cast(batch['row'], tf.int32)}
    batches = records.batch(batch_size, drop_remainder=full_batches)
    if full_batches:
      batches = batches.take(num_batches)  # before decoding: none is decoded in vain
    return batches.map(decode_batch, **parallel)

  def train_batches(self, batch_size, seed, epoch, config, start_step=0, process=None):
    del config  # augmentation is fixed at construction (flip)
    for batch in self.dataset(batch_size, seed, epoch, start_step, process).as_numpy_iterator():
      batch['labels'] = self.observed[batch['indices']]
      yield batch

  def eval_batches(self, batch_size, process=None):
    """This process's part of each global batch: its own images, padded, and as many batches on
    every process (the eval step is collective): those of the largest part."""
    process_index, process_count = _process(process)
    local_batch = batch_size // process_count
    records = self._rows(None, process_index, process_count).map(
        lambda record: dict(record, mirror=False))
    num_batches = int(max(-(-size // local_batch) for size in self.part_sizes(process_count)))
    emitted = 0
    dataset = self._decoded_batches(records, local_batch, num_batches=None)
    for batch in dataset.prefetch(AUTOTUNE).as_numpy_iterator():
      emitted += 1
      yield pad_batch(batch, local_batch)
    empty = {'images': np.zeros((0,) + self.example_shape, np.uint8),
             'indices': np.zeros((0,), np.int32)}
    for _ in range(num_batches - emitted):
      yield pad_batch(empty, local_batch)


# ------------------------------------------------------------------------------------------------
# Sources.

@dataclasses.dataclass
class Source:
  """What a dataset provides before the protocol: the official train and test label matrices
  (rows in the official order) and either the examples in memory or a record reader per split."""
  name: str
  train_labels: np.ndarray
  test_labels: np.ndarray
  label_names: List[str]
  train_examples: Optional[np.ndarray] = None   # in memory: (N, ...) by official row
  test_examples: Optional[np.ndarray] = None
  train_records: Optional[RecordReader] = None  # streamed
  test_records: Optional[RecordReader] = None
  exact_shuffle: bool = False
  validation_labels: Optional[np.ndarray] = None  # features .npz with its own val_* split
  validation_examples: Optional[np.ndarray] = None


# The TFDS builders of hml_jax/datasets: prepared offline (generated or from manual_dir files).
OUR_BUILDERS = ('composite_digits', 'glyph_digits', 'glyph_pretraining', 'hml_voc2012',
                'hml_coco2014', 'hml_cub', 'hml_nus_wide')


def load_tfds_builder(dataset_config):
  """The TFDS builder of config.dataset, prepared: generated offline for the embedded dataset,
  from the original files in config.dataset.manual_dir for the paper's datasets."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from hml_jax import datasets  # pylint: disable=g-import-not-at-top
  datasets.register_all()
  name = dataset_config.name
  if dataset_config.get('builder_config'):
    name = f'{name}/{dataset_config.builder_config}'
  if dataset_config.name not in OUR_BUILDERS:
    # Anything else would be a TFDS catalog name, which download_and_prepare would download.
    raise ValueError(
        f'Unknown dataset {dataset_config.name!r} (config.dataset.name); choose one of '
        f"{sorted(OUR_BUILDERS) + ['folder', 'features', 'voc/2012', 'coco/2014']}.")
  builder = tfds.builder(name, data_dir=dataset_config.get('data_dir') or None)
  manual_dir = dataset_config.get('manual_dir') or None
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder


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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cache = os.path.join(builder.data_dir, f'hml_labels_v2_{split}.npz')
  shard_lengths = np.asarray(builder.info.splits[split].shard_lengths, np.int64)
  cached = _read_label_cache(cache, shard_lengths)
  if cached is not None:
    return cached
  start = time.time()
  # One file after the other (no interleaving): the records then come in storage order, the
  # positions a process's slice 'train[a:b]' (_tfds_records) selects.
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               read_config=tfds.ReadConfig(interleave_cycle_length=1),
                               decoders={'image': tfds.decode.SkipDecoding()})
  dataset = dataset.map(lambda x: {'labels': x['labels'], 'index': x['index']})
  parts = list(tfds.as_numpy(dataset.batch(4096)))
  index = np.concatenate([p['index'] for p in parts]).astype(np.int64)
  labels = np.concatenate([p['labels'] for p in parts])
  if not np.array_equal(np.sort(index), np.arange(len(index))):
    raise ValueError(f'{builder.info.full_name} split {split!r}: the "index" feature is not a '
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


def tfds_subsplit(split: str, start: int, stop: int, num_records: int) -> str:
  """The TFDS split string of the records at storage positions [start, stop) of split (of
  num_records): its own name when that is all of it, else an absolute slice 'train[a:b]'."""
  if (start, stop) == (0, num_records):
    return split  # one process: exactly the reads of a whole split
  return f'{split}[{start}:{stop}]'


def _tfds_records(builder, split: str, storage_index: np.ndarray) -> RecordReader:
  """The RecordReader of a split of one of our builders (storage_index from _tfds_label_matrix).

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
    dataset = builder.as_dataset(split=tfds_subsplit(split, start, stop, len(storage_index)),
                                 shuffle_files=shuffle_seed is not None,
                                 read_config=read_config,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    return dataset.map(lambda x: {'image': x['image'], 'index': x['index']})
  return RecordReader(f'{builder.info.full_name} {split}', read, storage_index)


def tfds_source(dataset_config, in_memory: bool) -> Source:
  builder = load_tfds_builder(dataset_config)
  label_names = builder.info.metadata.get('label_names') if builder.info.metadata else None
  if in_memory:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    arrays = {}
    for split in ('train', 'test'):
      data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
      # TFDS stores examples in hashed-key order; restore the official order.
      order = np.argsort(data['index'], kind='stable')
      arrays[split] = data['image'][order], data['labels'][order].astype(np.int32)
    return Source(builder.info.full_name, arrays['train'][1], arrays['test'][1],
                  list(label_names or range(arrays['train'][1].shape[1])),
                  train_examples=arrays['train'][0], test_examples=arrays['test'][0])
  train_labels, train_storage = _tfds_label_matrix(builder, 'train')
  test_labels, test_storage = _tfds_label_matrix(builder, 'test')
  return Source(builder.info.full_name, train_labels, test_labels,
                list(label_names or range(train_labels.shape[1])),
                train_records=_tfds_records(builder, 'train', train_storage),
                test_records=_tfds_records(builder, 'test', test_storage))


def load_source(config) -> Source:
  name = config.dataset.name
  if name == 'features':
    from hml_jax.datasets import features  # pylint: disable=g-import-not-at-top
    return features.load_source(config.dataset)
  if name == 'folder':
    from hml_jax.datasets import folder  # pylint: disable=g-import-not-at-top
    return folder.load_source(config.dataset)
  if name in ('voc/2012', 'coco/2014'):  # TFDS's catalog, already prepared by the user
    from hml_jax.datasets import catalog  # pylint: disable=g-import-not-at-top
    return catalog.load_source(config.dataset)
  return tfds_source(config.dataset, in_memory=config.dataset.get('in_memory', True))


# ------------------------------------------------------------------------------------------------
# The protocol.

def _check_source(source: Source, config):
  labels_lib.check_binary(source.train_labels, f'{source.name} train labels')
  labels_lib.check_binary(source.test_labels, f'{source.name} test labels')
  if source.train_labels.shape[1] != source.test_labels.shape[1]:
    raise ValueError(f'{source.name}: train has {source.train_labels.shape[1]} labels, test '
                     f'{source.test_labels.shape[1]}.')
  for split, labels in (('train', source.train_labels), ('test', source.test_labels)):
    if not len(labels):
      raise ValueError(f'{source.name}: the {split} split is empty.')
  if source.train_examples is None or source.train_examples.ndim != 4:
    return
  for split, images in (('train', source.train_examples), ('test', source.test_examples)):
    expected = (config.image_size, config.image_size)
    if images.shape[1:3] != expected:
      raise ValueError(
          f'Images of {source.name} split {split!r} are {images.shape[1:3]}, but '
          f'config.image_size is {config.image_size}: set config.image_size={images.shape[1]}.')
  channels = source.train_examples.shape[-1]
  for key in ('mean', 'std'):
    if len(config.dataset[key]) not in (1, channels):
      raise ValueError(f'config.dataset.{key} has {len(config.dataset[key])} values but the images '
                       f'of {source.name} have {channels} channel(s).')


def protocol_indices(train_labels: np.ndarray, config):
  """Steps 2-3 of Cole et al.'s protocol on the official train split's label matrix:
  (observed labels of the whole split, train rows, validation rows)."""
  observed = labels_lib.observe(train_labels, config.label_scenario, seed=config.label_seed,
                                fraction=config.get('positive_fraction'))
  train_rows, validation_rows = labels_lib.validation_split(
      len(train_labels), seed=config.validation_seed, fraction=config.validation_fraction)
  return observed, train_rows, validation_rows


def _rows_of_index(num_official: int, rows: np.ndarray) -> np.ndarray:
  rows_of_index = np.full(num_official, -1, np.int64)
  rows_of_index[rows] = np.arange(len(rows))
  return rows_of_index


def apply_protocol(source: Source, config) -> Data:
  """Train / validation / test splits with the protocol of Cole et al. (CVPR 2021).

  1. observed labels for the whole official train split (labels.observe, config.label_seed);
  2. validation = config.validation_fraction of the train split (config.validation_seed), unless
     the source brings its own validation split (features .npz with val_*);
  3. validation and test keep their true, full labels.
  """
  _check_source(source, config)
  train_labels = source.train_labels
  if source.validation_labels is not None:
    observed = labels_lib.observe(train_labels, config.label_scenario, seed=config.label_seed,
                                  fraction=config.get('positive_fraction'))
    train_rows = np.arange(len(train_labels))
    validation_rows = None
  else:
    observed, train_rows, validation_rows = protocol_indices(train_labels, config)

  feature_statistics = None
  if source.train_examples is not None and source.train_examples.dtype == np.float32:
    source, feature_statistics = standardize_features(
        source, train_rows, config.dataset.get('standardize', 'none'))
  if source.train_examples is not None:
    if validation_rows is None:
      validation = ArraySplit(source.validation_examples, source.validation_labels,
                              source.validation_labels)
    else:
      validation = ArraySplit(source.train_examples[validation_rows],
                              train_labels[validation_rows], train_labels[validation_rows])
    train = ArraySplit(source.train_examples[train_rows], train_labels[train_rows],
                       observed[train_rows])
    test = ArraySplit(source.test_examples, source.test_labels, source.test_labels)
  else:
    dataset = config.dataset
    common = dict(image_size=config.image_size, shuffle_buffer=dataset.get('shuffle_buffer', 10000),
                  parallel_calls=dataset.get('parallel_calls', AUTOTUNE),
                  exact_shuffle=source.exact_shuffle, decoder=image_decoder(dataset))
    num_official = len(train_labels)
    train = ImageSplit(source.train_records, _rows_of_index(num_official, train_rows),
                       train_labels[train_rows], observed[train_rows],
                       flip=dataset.get('augment_flip', True), **common)
    validation = ImageSplit(source.train_records, _rows_of_index(num_official, validation_rows),
                            train_labels[validation_rows], train_labels[validation_rows],
                            flip=False, **common)
    test = ImageSplit(source.test_records, np.arange(len(source.test_labels)),
                      source.test_labels, source.test_labels, flip=False, **common)
  data = Data(train=train, validation=validation, test=test,
              label_names=[str(name) for name in source.label_names],
              feature_statistics=feature_statistics)
  logging.info('Data %s: train %d (%.2f observed / %.2f true positives per image), validation %d, '
               'test %d, %d labels.', source.name, len(data.train),
               data.train.observed.sum(1).mean(), data.train.labels.sum(1).mean(),
               len(data.validation), len(data.test), len(data.label_names))
  return data


FEATURE_STANDARDIZATIONS = ('none', 'standardize', 'l2')


def standardize_features(source: Source, train_rows: np.ndarray, how: str):
  """(source, statistics) with features-mode inputs rescaled (config.dataset.standardize):
  'none'; 'standardize', each dimension to zero mean and unit variance with the mean and std of
  the training rows only (a dimension constant there, e.g. a dead ReLU, keeps std 1); 'l2', each
  row to unit L2 norm (no statistics). A linear head trained by Adam is sensitive to the features'
  scale (docs/results.md, "Features mode and feature scale")."""
  if how not in FEATURE_STANDARDIZATIONS:
    raise ValueError(f'config.dataset.standardize={how!r}: choose one of '
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
  replaced = {'train_examples': transform(source.train_examples),
              'test_examples': transform(source.test_examples)}
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
  return apply_protocol(load_source(config), config)
