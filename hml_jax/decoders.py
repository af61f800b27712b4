"""How encoded images become (image_size, image_size, 3) uint8 arrays: config.dataset.decoder.

Used by splits.ImageSplit (streamed images) and the folder loader; the same numerics as Cole et
al.'s loader (PIL + torchvision's Resize).
"""
import io

import numpy as np
from PIL import Image

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
