"""The one TFDS builder skeleton of the generated datasets (composite_digits, glyph_pretraining,
glyph_source, glyph_digits): features 'image' (PNG), 'labels' (uint8, one per label) and 'index'
(the official order), a train and a test split drawn by GENERATE, nothing to download.

They are prepared as array_record files and read without TensorFlow (tfds.data_source): the
images are stored as PNG bytes that Pillow writes, since TFDS encodes an image array only
through TensorFlow, and read back undecoded and decoded by Pillow (decode_png). PNG is lossless:
the pixels read are the pixels drawn (hml_jax/datasets/digests.py checks them)."""
import io
from typing import Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# The file format of the prepared generated datasets (registry.py prepares them so).
FILE_FORMAT = 'array_record'


def encode_png(image: np.ndarray) -> bytes:
  """(H, W, 1) or (H, W, 3) uint8 -> PNG bytes (Pillow)."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, 'PNG')
  return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
  """PNG bytes -> (H, W, channels) uint8, the inverse of encode_png."""
  with Image.open(io.BytesIO(data)) as image:
    array = np.asarray(image.convert('L' if channels == 1 else 'RGB'))
  return array[..., None] if channels == 1 else array


class GeneratedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A generated dataset. Subclasses set LABEL_NAMES, PAIRS (the label pairs drawn together, in
  the metadata for hml_jax.analyze), GENERATE(split, builder_config.generator) -> (index, image
  (H, W, C) uint8, labels) and BUILDER_CONFIGS, whose generator has image_size; CHANNELS and
  HOMEPAGE where they differ."""
  LABEL_NAMES: Tuple[str, ...] = ()
  PAIRS: Sequence[Tuple[int, int]] = ()
  GENERATE = None
  CHANNELS = 1
  HOMEPAGE = None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.generator.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, self.CHANNELS), encoding_format='png'),
            'labels': tfds.features.Tensor(shape=(len(self.LABEL_NAMES),), dtype=np.uint8),
            'index': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=None,
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(label_names=list(self.LABEL_NAMES),
                                        partner_pairs=[list(p) for p in self.PAIRS]),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: drawn from seeds
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    generate = type(self).GENERATE
    for index, image, labels in generate(split, self.builder_config.generator):
      yield index, {'image': encode_png(image), 'labels': labels, 'index': index}
