"""Speed of one configuration on this machine, as one JSON line.

  python -m hml_jax.benchmark --config=configs/voc.py [--config.batch_size=16]
      [--config.image_size=224] [--steps=20] [--input_images=256]
      [--config.parameter_sharding=fsdp]

Synthetic data of the config's shape, so no dataset is needed: the real jitted train step (the
config's loss, model, optimizer and sharding over every device) and eval step, timed in steady
state after compilation, and the tf.data image pipeline alone decoding real JPEGs (500x375,
resized to config.image_size). Keys: train_images_per_sec, compile_seconds,
eval_images_per_sec, input_images_per_sec, train_flops_per_image and train_tflops_per_sec (XLA's
count of the step's operations before the backend rewrites them, all devices together, for
MFU), step_memory_mb (XLA's estimate of the train step's memory on each device: arguments,
outputs and temporaries), peak_host_memory_mb, device, memory_allocator (tbbmalloc, tcmalloc or
the system's: on CPU it matters, docs/performance.md "Speed on CPU"), jax, config.
benchmarks/torch_reference.py prints the same keys for PyTorch.
"""
import json
import os
import resource
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np
from PIL import Image

from hml_jax import methods
from hml_jax import models
from hml_jax.models import layers
from hml_jax.runtime import allocator
from hml_jax.runtime import errors
from hml_jax.runtime import host
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state
from hml_jax.tools import cli
from hml_jax.training import input_pipeline
from hml_jax.training import loss_arguments

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when this module runs as a program (no clash with other tools' flags)."""
  cli.define_config_flag('A training configuration.')
  flags.DEFINE_integer(
      'steps', 20, 'Timed train steps (after 2 warm-up steps); 0: compile and '
      'report memory only.')
  flags.DEFINE_integer('num_labels', 20, 'Labels of the synthetic data.')
  flags.DEFINE_integer(
      'input_images', 256, 'JPEGs for the input pipeline measurement (0: skip; '
      f'else at least {MIN_PHOTOS}).')
  flags.mark_flags_as_required(['config'])


def image_and_batch_sizes(image_size: str, batch_size: str):
  """The scripts' --image_size=224,448 --batch_size=64,16 -> [(224, 64), (448, 16)]; one batch
  size serves every image size. Raises ValueError naming both flags when the counts differ."""
  image_sizes = [int(size) for size in image_size.split(',')]
  batch_sizes = [int(size) for size in batch_size.split(',')]
  if len(batch_sizes) == 1:
    batch_sizes *= len(image_sizes)
  if len(batch_sizes) != len(image_sizes):
    raise errors.InvalidInputError(
        f'--batch_size={batch_size} gives {len(batch_sizes)} batch sizes for '
        f'{len(image_sizes)} image sizes (--image_size={image_size})')
  return list(zip(image_sizes, batch_sizes))


def write_photos(root, num_images, seed=0, num_test=1):
  """num_images smooth random 500x375 photos (gradients, blobs, a little noise; they compress
  like real ones, quality 90) as a folder dataset (hml_jax/datasets/folder.py): the last
  num_test in test.csv, the others in train.csv."""
  rng = np.random.RandomState(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  rows = []
  for i in range(num_images):
    image = np.zeros((375, 500, 3), np.float32)
    for channel in range(3):
      image[..., channel] = (rng.rand() * xx / 500 + rng.rand() * yy / 375) * 120
    for _ in range(6):
      cy, cx, radius = rng.rand() * 375, rng.rand() * 500, 20 + rng.rand() * 80
      blob = np.exp(-((yy - cy)**2 + (xx - cx)**2) / (2 * radius**2))
      image += blob[..., None] * rng.rand(3) * 150
    image += rng.randn(*image.shape) * 6
    name = f'images/{i:05d}.jpg'
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(root, name),
                                                                  quality=90)
    rows.append(f'{name},label{i % 5} label{(i * 7) % 11}')
  with open(os.path.join(root, 'train.csv'), 'w') as f:
    f.write('filename,labels\n' + '\n'.join(rows[:-num_test]) + '\n')
  with open(os.path.join(root, 'test.csv'), 'w') as f:
    f.write('filename,labels\n' + '\n'.join(rows[-num_test:]) + '\n')
  return root


# write_photos' photos for a pipeline measurement: one test, one validation, one training photo.
MIN_PHOTOS = 3


def photo_folder_config(root, num_images, image_size, decoder=None, parallel_calls=-1):
  """configs/folder.py over write_photos(root, num_images)'s photos at image_size, one of its
  training photos held out for validation; decoder None: the folder config's default."""
  from hml_jax.configs import folder as folder_config  # pylint: disable=g-import-not-at-top
  config = folder_config.get_config()
  config.dataset.path = root
  # write_photos puts num_images - 1 photos in train.csv: this fraction of them is one photo.
  config.validation_fraction = 1.0 / (num_images - 1)
  config.image_size = image_size
  config.dataset.parallel_calls = parallel_calls
  if decoder is not None:
    config.dataset.decoder = decoder
  return config


def epoch_images_per_sec(split, batch_size, epochs, transform=None) -> float:
  """Images/s of split.train_batches over the given training epochs, one after the other;
  transform(images) is applied to each batch's images, inside the timing."""
  start, count = time.perf_counter(), 0
  for epoch in epochs:
    for batch in split.train_batches(batch_size, seed=0, epoch=epoch):
      images = batch['images'] if transform is None else transform(batch['images'])
      count += len(images)
  return count / (time.perf_counter() - start)


def check_input_images(num_images, allow_zero=True):
  """Raises ValueError unless num_images photos are enough for a pipeline measurement (0: none
  is made, where allowed)."""
  if not (num_images >= MIN_PHOTOS or (allow_zero and num_images == 0)):
    raise errors.InvalidInputError(
        f'input_images={num_images}: the input pipeline needs at least '
        f'{MIN_PHOTOS} photos (one test, one validation, one training), or 0 to skip')


def input_pipeline_rate(config, num_images, batch_size):
  """Images/s of splits.ImageSplit (read, decode, resize, flip, batch) over one epoch of
  num_images JPEGs, after a warm-up epoch, with the config's image size, parallel_calls and
  decoder (a config without image data, the digits, gets the folder config's decoder)."""
  check_input_images(num_images, allow_zero=False)
  with tempfile.TemporaryDirectory() as root:
    write_photos(root, num_images)
    split = input_pipeline.load(
        photo_folder_config(root, num_images, config.image_size, config.dataset.decoder,
                            config.dataset.parallel_calls)).train
    batch_size = min(batch_size, len(split))
    epoch_images_per_sec(split, batch_size, [1])  # warm-up: tf.data graph, file cache
    return epoch_images_per_sec(split, batch_size, [2])


def xla_flops(stage) -> float:
  """Floating-point operations of one call of a lowered or compiled function by XLA's cost
  analysis (0 when the backend gives none)."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except (a backend without cost analysis)
    return 0.0
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def network_flops(lowered, compiled, num_devices: int) -> float:
  """The whole step's floating-point operations as the network defines them, over all devices,
  for MFU: counted on the lowered program, before the backend rewrites it (and before SPMD
  partitioning). After compilation the GPU backend has turned every convolution into a cuDNN
  call that its cost analysis does not count (on an H200 it gave 0.42 GFLOP per 224x224 image
  instead of 23.7); the compiled count, one device's share, is the fallback."""
  return xla_flops(lowered) or xla_flops(compiled) * num_devices


def synthetic_train_step(config, num_labels=20):
  """The config's real jitted train and eval steps, an initial state and one synthetic batch of
  the config's shape on every device: (train_fn, eval_fn, state, batch, schedule, mesh). Also
  used by benchmarks/profile_train_step.py."""
  method = methods.get_method(config.loss)
  mesh = sharding.create_mesh()
  dtype = jax.numpy.bfloat16 if config.half_precision else jax.numpy.float32
  model = models.create_model(config.model,
                              method.head,
                              num_labels,
                              dtype=dtype,
                              convolutions=config.convolutions)
  image_shape = (config.image_size, config.image_size, 3)
  rng = np.random.RandomState(0)
  num_train = max(config.batch_size * 4, 64)
  observed = np.zeros((num_train, num_labels), np.int32)
  observed[np.arange(num_train), rng.randint(0, num_labels, num_train)] = 1
  settings = steps.StepSettings.from_config(config)
  state = train_state.create_train_state(settings.state,
                                         model,
                                         method,
                                         jax.random.key(0),
                                         image_shape,
                                         observed_labels=observed)
  # config.parameter_sharding: 'replicated' or 'fsdp' (compare their step_memory_mb).
  state_shardings = train_state.train_state_shardings(settings.state, state, mesh)
  state = sharding.place(state, state_shardings)
  hyperparameters = loss_arguments.loss_hyperparameters(method, config, observed)
  train_fn, eval_fn = steps.make_step_functions(method, settings, mesh, hyperparameters,
                                                state_shardings)
  schedule = {
      key: np.asarray(value)
      for key, value in loss_arguments.epoch_schedule(method, config, 2, config.batch_size *
                                                      num_labels).items()
  }
  indices = np.arange(config.batch_size, dtype=np.int32)
  batch = sharding.shard_batch(
      {
          'images': rng.randint(0, 256, (config.batch_size,) + image_shape).astype(np.uint8),
          'labels': observed[indices],
          'indices': indices
      }, mesh)
  return train_fn, eval_fn, state, batch, schedule, mesh


def synthetic_eval_batch(config, mesh, rng):
  """An evaluation batch of config.eval_batch_size random uint8 images, laid out on the mesh."""
  images = rng.randint(0, 256, (config.eval_batch_size, config.image_size, config.image_size, 3))
  return sharding.shard_batch(
      {
          'images': images.astype(np.uint8),
          'indices': np.arange(config.eval_batch_size, dtype=np.int32),
          'mask': np.ones(config.eval_batch_size, bool)
      }, mesh)


def benchmark(config, steps=20, num_labels=20, input_images=256):
  check_input_images(input_images)  # before minutes of compiling and timing, not after
  train_fn, eval_fn, state, batch, schedule, mesh = synthetic_train_step(config, num_labels)
  batch_size = config.batch_size
  rng = np.random.RandomState(1)

  start = time.perf_counter()
  lowered = train_fn.lower(state, batch, schedule)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  # Memory per device: the compiled program is the one each device runs after SPMD partitioning.
  memory = compiled.memory_analysis()
  flops_per_image = network_flops(lowered, compiled, jax.device_count()) / batch_size
  step_memory_mb = None
  if memory is not None:
    step_memory_mb = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                      memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**20
  train_rate = eval_rate = None
  if steps:  # --steps=0: compilation and memory only
    for _ in range(2):  # warm-up
      state, metrics = train_fn(state, batch, schedule)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = train_fn(state, batch, schedule)
    jax.block_until_ready(metrics)
    train_rate = steps * batch_size / (time.perf_counter() - start)

    eval_batch = synthetic_eval_batch(config, mesh, rng)
    # Two warm-ups, as for training: the first compiles, and the second still runs at about 80%
    # of the steady rate on CPU (the allocator's cache holds the train step's blocks; 6.8 against
    # 8.4 img/s at 224x224 with tcmalloc and TBB's malloc alike). A user's evaluation runs
    # thousands of batches. benchmarks/torch_reference.py times PyTorch's the same way.
    for _ in range(2):
      jax.block_until_ready(eval_fn(state, eval_batch))
    eval_steps = max(3, steps // 2)
    start = time.perf_counter()
    for _ in range(eval_steps):
      result = eval_fn(state, eval_batch)
    jax.block_until_ready(result)
    eval_rate = eval_steps * config.eval_batch_size / (time.perf_counter() - start)

  input_rate = (input_pipeline_rate(config, input_images, batch_size) if input_images else None)
  return {
      'framework': 'jax',
      'train_images_per_sec': None if train_rate is None else round(train_rate, 2),
      'compile_seconds': round(compile_seconds, 2),
      'eval_images_per_sec': None if eval_rate is None else round(eval_rate, 2),
      'input_images_per_sec': None if input_rate is None else round(input_rate, 1),
      # XLA's count of the step's floating-point operations (forward, backward, optimizer), per
      # image: with train_images_per_sec and the peak of all devices this gives the MFU.
      'train_flops_per_image': None if not flops_per_image else round(flops_per_image),
      'train_tflops_per_sec': (None if not flops_per_image or train_rate is None else round(
          flops_per_image * train_rate / 1e12, 3)),
      'step_memory_mb': None if step_memory_mb is None else round(step_memory_mb, 1),
      'peak_host_memory_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      # On CPU the allocator changes the train step's speed by 1.1-1.4x (allocator.py).
      'memory_allocator': allocator.memory_allocator(),
      'jax': jax.__version__,
      'config': {
          'model': config.model,
          'loss': config.loss,
          'image_size': config.image_size,
          'batch_size': batch_size,
          'half_precision': bool(config.half_precision),
          'convolutions': layers.resolve_convolutions(config.convolutions),
          'num_labels': num_labels,
          'parameter_sharding': config.parameter_sharding
      },
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup(compilation_cache=False)  # compile_seconds times the compiler, not a cache read
  print(json.dumps(benchmark(FLAGS.config, FLAGS.steps, FLAGS.num_labels, FLAGS.input_images)))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
