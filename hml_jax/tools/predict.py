"""Apply a trained model to images.

  python -m hml_jax.predict --workdir=DIR [--threshold=0.5] [--top_k=5] [--json] IMAGE_OR_FOLDER ...

For each image: the labels whose probability reaches the threshold, and the top-k labels with
their probabilities, named with the label names saved with the run (DIR/dataset.json). Folders are
walked (sorted, hidden files skipped); a file that is not a readable image gets a message and the
others continue. Images are resized to the run's image size exactly as evaluation does.
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from hml_jax.data import decoders
from hml_jax.data import splits
from hml_jax.runtime import errors
from hml_jax.runtime import host
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state
from hml_jax.state import workdir_files
from hml_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when this module runs as a program (no clash with other tools' flags)."""
  flags.DEFINE_string('workdir', None, 'A training workdir (its best checkpoint is used).')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
  flags.DEFINE_float('threshold', 0.5, 'Report the labels with at least this probability.')
  flags.DEFINE_integer('top_k', 5, 'Also report the k most probable labels.')
  flags.DEFINE_bool('json', False, 'One JSON document on stdout instead of text.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.mark_flags_as_required(['workdir'])


def list_files(paths):
  """The files named, and every non-hidden file below the folders named, in sorted order."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      for root, directories, names in os.walk(path):
        directories[:] = sorted(d for d in directories if not d.startswith('.'))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith('.'))
    else:
      files.append(path)
  return files


def load_image(path, image_size, channels, decoder, max_pixels=decoders.DEFAULT_MAX_IMAGE_PIXELS):
  """(image uint8 (size, size, channels), None) or (None, why it cannot be read); decoder: the
  run's config.dataset.decoder, so that images are prepared as in training. An image whose header
  declares more than max_pixels pixels (the run's config.dataset.max_image_pixels) is refused
  before it is decoded, whichever the decoder."""
  try:
    with open(path, 'rb') as f:
      encoded = f.read()
  except FileNotFoundError:
    return None, 'no such file'
  except IsADirectoryError:
    return None, 'is a directory'
  except OSError as error:
    return None, f'cannot be read ({error.strerror or error})'
  try:
    if decoder == 'pil':
      return decoders.decode_and_resize_with_pil(encoded, image_size, channels, max_pixels), None
    decoders.check_encoded_size(encoded, max_pixels)
  except decoders.ImageTooLargeError as error:
    return None, f'the image {error.problem}'
  except ValueError as error:  # 'not a readable image (...)'
    return None, str(error)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return np.asarray(decoders.decode_and_resize_with_tensorflow(encoded, image_size,
                                                                 channels)), None
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError) as error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None, f'not a readable image ({message})'


class Predictor:
  """A trained run's model as a function of images: probabilities (N, num_labels)."""

  def __init__(self, workdir, which='best'):
    self.workdir = workdir
    self.mesh = sharding.create_mesh()
    self.config, self.method, self.state = train_state.load_trained_state(workdir, which, self.mesh)
    info = workdir_files.read_dataset_info(workdir)
    self.label_names = info['label_names']
    self.decoder = decoders.image_decoder(self.config.dataset)
    self.example_shape = tuple(info['example_shape'])
    if len(self.example_shape) != 3:
      raise errors.InvalidInputError(
          f'{workdir} was trained on features (input shape {self.example_shape}), '
          'not images: there is nothing to predict from an image file.')
    settings = steps.StepSettings.from_config(self.config)
    _, self.eval_fn = steps.make_step_functions(self.method,
                                                settings,
                                                self.mesh,
                                                state_shardings=train_state.train_state_shardings(
                                                    settings.state, self.state, self.mesh))

  def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    """images (N, H, W, C) uint8 -> (N, num_labels); batches are padded to one shape."""
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = splits.pad_batch(
          {
              'images': images[start:start + batch_size],
              'indices': np.arange(start, min(start + batch_size, len(images)), dtype=np.int32)
          }, batch_size)
      result = self.eval_fn(self.state, sharding.shard_batch(batch, self.mesh))
      outputs.append(np.asarray(jax.device_get(result['scores']))[batch['mask']])
    scores = np.concatenate(outputs).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-scores))


def predict_files(predictor, paths, threshold=0.5, top_k=5, batch_size=32):
  """{'predictions': [{'path', 'labels': [{'label', 'probability'}], 'top_k': [...]}],
  'errors': [{'path', 'error'}]}."""
  image_size, channels = predictor.example_shape[0], predictor.example_shape[2]
  max_pixels = decoders.max_image_pixels(predictor.config.dataset)
  images, readable, errors = [], [], []
  for path in list_files(paths):
    image, error = load_image(path, image_size, channels, predictor.decoder, max_pixels)
    if error:
      errors.append({'path': path, 'error': error})
    else:
      images.append(image)
      readable.append(path)
  predictions = []
  if images:
    probabilities = predictor.probabilities(np.stack(images), batch_size)
    names = predictor.label_names
    top_k = min(top_k, len(names))
    for path, row in zip(readable, probabilities):
      order = np.argsort(-row, kind='stable')
      predictions.append({
          'path': path,
          'labels': [{
              'label': names[j],
              'probability': float(row[j])
          } for j in order if row[j] >= threshold],
          'top_k': [{
              'label': names[j],
              'probability': float(row[j])
          } for j in order[:top_k]],
      })
  return {
      'workdir': predictor.workdir,
      'threshold': threshold,
      'predictions': predictions,
      'errors': errors
  }


def format_text(result) -> str:
  lines = []
  for prediction in result['predictions']:
    above = ', '.join(f"{p['label']} ({p['probability']:.2f})" for p in prediction['labels'])
    top = ', '.join(f"{p['label']} {p['probability']:.2f}" for p in prediction['top_k'])
    lines.append(f"{prediction['path']}: {above or '(no label)'}  |  "
                 f"top-{len(prediction['top_k'])}: {top}")
  return '\n'.join(lines)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name at least one image or folder.')
  host.setup()
  predictor = Predictor(FLAGS.workdir, FLAGS.checkpoint)
  result = predict_files(predictor, paths, FLAGS.threshold, FLAGS.top_k, FLAGS.batch_size)
  if not result['predictions']:
    skipped = '; '.join(f"{error['path']}: {error['error']}" for error in result['errors'][:3])
    more = f' (and {len(result["errors"]) - 3} more)' if len(result['errors']) > 3 else ''
    raise errors.InvalidInputError(
        f'No image to predict from: {skipped or "the folders hold no files"}{more}.')
  for error in result['errors']:
    print(f"{error['path']}: skipped, {error['error']}", file=sys.stderr)
  if FLAGS.json:
    print(json.dumps(result, indent=2))
  else:
    print(format_text(result))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
