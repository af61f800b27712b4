"""How encoded images become (image_size, image_size, 3) uint8 arrays: config.dataset.decoder.

Used by splits.ImageSplit (streamed images) and the folder loader; the same numerics as Cole et
al.'s loader (PIL + torchvision's Resize).

Every image PIL opens here is refused above config.dataset.max_image_pixels before it is decoded
(open_image): its size comes from the header, which is all Image.open reads. A few kilobytes of
PNG can declare 130 million pixels, which PIL's own check only warns about (it refuses above
twice its Image.MAX_IMAGE_PIXELS) and which then cost seconds and hundreds of MiB per decode.
"""
import io
import re

import numpy as np
from PIL import Image

from hml_jax.runtime import errors

# How encoded images become (image_size, image_size, 3) uint8 arrays (config.dataset.decoder):
#   'pil': PIL's decode and resize, exactly what Cole et al.'s loader and torchvision's
#     Resize((size, size)) compute, and 1.6-2.5x faster per core than 'tensorflow'
#     (docs/history.md, "Input pipeline"). Runs as Python in tf.data's threads: PIL
#     releases the GIL while it decodes and resizes, and holds it for 0.07-0.13 ms per image
#     (uncontended; benchmarks/benchmark_decode.py).
#   'tensorflow': tf.io.decode_image + tf.image.resize(antialias=True), in TensorFlow's C++
#     threads (no GIL): slower per core, but free of the GIL's bound on a host with many cores
#     per process. Its resize is within 1 grey level of PIL's; its JPEG decoder rounds
#     differently (about 1 level on average).
DECODERS = ('pil', 'tensorflow')
# 16-bit images: PIL's convert('RGB') (and so torchvision's loader) clips them at 255; they are
# scaled to 8 bits first, as TensorFlow's decoder does.
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')

# PIL's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3, about 256 MiB of RGB), as a
# fixed number: the limit does not change with what other code sets in PIL.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_PIXELS_KEY = 'config.dataset.max_image_pixels'


class ImageTooLargeError(errors.InvalidInputError):
  """An image whose header declares more pixels than config.dataset.max_image_pixels."""

  def __init__(self, name: str, problem: str):
    super().__init__(f'{name} {problem}')
    self.problem = problem  # the message without the name, for lists of files


def max_image_pixels(dataset_config) -> int:
  """config.dataset.max_image_pixels, checked."""
  value = dataset_config.max_image_pixels
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise errors.InvalidInputError(
        f'{MAX_PIXELS_KEY}={value!r} must be a positive whole number of pixels (default '
        f'{DEFAULT_MAX_IMAGE_PIXELS}).')
  return value


def _allow_in_pil(max_pixels: int) -> None:
  """Lifts PIL's own limit to max_pixels where the user set ours above it (PIL warns above its
  Image.MAX_IMAGE_PIXELS and refuses above twice it); open_image enforces max_pixels. Only ever
  raised, and only to a limit the user asked for."""
  if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = max_pixels


def too_large_problem(pixels: int, max_pixels: int, size=None) -> str:
  """Why an image of `pixels` (width x height `size`, if known) is refused, and what to do."""
  dimensions = f'{size[0]}x{size[1]} = ' if size else ''
  return (f'is {dimensions}{pixels:,} pixels, more than {MAX_PIXELS_KEY}={max_pixels:,}: '
          f'decoding it would take {pixels * 3 / 2**20:,.0f} MiB, and a few kilobytes of '
          'compressed file can declare that many (a decompression bomb). If the image is genuine, '
          f'shrink it or raise the limit (--{MAX_PIXELS_KEY}={pixels}); else remove it.')


def open_image(source, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, name: str = 'the image'):
  """Image.open(source) (a path or a file object: only the header is read), refused with
  ImageTooLargeError naming `name` if it declares more than max_pixels pixels. Use as a context
  manager, like Image.open."""
  _allow_in_pil(max_pixels)
  try:
    image = Image.open(source)
  except Image.DecompressionBombError as error:  # above twice PIL's limit: PIL refuses first
    found = re.search(r'\((\d+) pixels\)', str(error))
    pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1
    raise ImageTooLargeError(name, too_large_problem(pixels, max_pixels)) from None
  width, height = image.size
  if width * height > max_pixels:
    image.close()
    raise ImageTooLargeError(name, too_large_problem(width * height, max_pixels, (width, height)))
  return image


def check_encoded_size(encoded: bytes,
                       max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       name: str = 'the image') -> None:
  """ImageTooLargeError if the encoded image's header declares more than max_pixels pixels; for
  bytes that another decoder reads (TensorFlow's). Bytes PIL cannot identify pass: the decoder
  that follows says why they do not decode."""
  try:
    with open_image(io.BytesIO(encoded), max_pixels, name):
      pass
  except ImageTooLargeError:
    raise
  except (OSError, SyntaxError, ValueError):
    pass


def check_decoder(decoder: str) -> str:
  if decoder not in DECODERS:
    raise errors.InvalidInputError(f'config.dataset.decoder={decoder!r} is not one of {DECODERS}.')
  return decoder


def image_decoder(dataset_config) -> str:
  """config.dataset.decoder, checked; a config without the key (saved before it existed) means
  the decoder that runs had then."""
  return check_decoder(dataset_config.decoder)


def decode_and_resize_with_pil(encoded: bytes,
                               image_size: int,
                               channels: int = 3,
                               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                               name: str = 'the image') -> np.ndarray:
  """Encoded image bytes (any format PIL reads) -> (image_size, image_size, channels) uint8.

  Exactly torchvision's `Resize((image_size, image_size))(Image.open(f).convert('RGB'))`, Cole et
  al.'s preprocessing: PIL's bilinear filter, which widens with the scale factor when shrinking
  (antialiasing). 16-bit images are scaled to 8 bits first (SIXTEEN_BIT_MODES). channels=1
  converts to PIL's 'L' (ITU-R 601-2 luma) instead of 'RGB'. Raises ValueError for bytes that
  do not decode, ImageTooLargeError (a ValueError) naming `name` before decoding an image of
  more than max_pixels pixels."""
  mode = {1: 'L', 3: 'RGB'}[channels]
  try:
    with open_image(io.BytesIO(encoded), max_pixels, name) as image:
      if image.mode in SIXTEEN_BIT_MODES:
        sixteen_bit = np.asarray(image, np.float64)
        image = Image.fromarray(np.round(sixteen_bit * (255.0 / 65535.0)).astype(np.uint8))
      if image.mode != mode:  # convert() copies even when the mode is already right
        image = image.convert(mode)
      image = image.resize((image_size, image_size), Image.BILINEAR)
  except ImageTooLargeError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    # PIL names the stream it was given ('<_io.BytesIO object at 0x...>'), not the file.
    detail = re.sub(r' <_io\.BytesIO object at 0x[0-9a-f]+>', '', str(error))
    raise errors.InvalidInputError(
        f'not a readable image ({type(error).__name__}: {detail})') from error
  array = np.asarray(image)
  return array[:, :, None] if channels == 1 else array


def decode_batch_with_pil(encoded: np.ndarray,
                          mirror: np.ndarray,
                          rows: np.ndarray,
                          image_size: int,
                          max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """(B,) encoded images (bytes), (B,) bool, (B,) their rows in the split -> (B, image_size,
  image_size, 3) uint8: each image through decode_and_resize_with_pil, mirrored left-right
  where `mirror`. An image that does not decode, or declares more than max_pixels pixels,
  raises ValueError naming its row."""
  images = np.empty((len(encoded), image_size, image_size, 3), np.uint8)
  for i, (image_bytes, mirrored) in enumerate(zip(encoded, mirror)):
    try:
      image = decode_and_resize_with_pil(image_bytes, image_size, max_pixels=max_pixels)
    except ValueError as error:
      raise errors.InvalidInputError(f'Image of row {rows[i]} of this split: {error}') from error
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
