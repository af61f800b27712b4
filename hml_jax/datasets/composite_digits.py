"""The embedded default dataset: cluttered composites of scikit-learn's handwritten digits.

Each image holds several of the 8x8 digits that scikit-learn ships (`load_digits`, 1,797 images,
no download), rescaled and placed at random on a noisy canvas; its labels are the set of digits
present (10 labels). Train and test composites draw from disjoint source digits.

Planted label correlation (ground truth for paper Sec. 3.5 / Eq. 8): the digits form five
partner pairs, PARTNER_PAIRS. An image starts from 1-3 "seed" digits drawn uniformly; each
seed brings its partner along with probability `partner_probability`. So partners co-occur far
more often than other pairs, and a learned label correlation should rank them highest.

What makes it hard (real photos have each of these): distractor strokes and fragments of other
digits (half of a digit looks much like a digit), Gaussian noise and a background gradient, digit
sizes from `min_digit_size` to `max_digit_size` pixels, overlaps, and occluding patches that hide
part of a digit. Every parameter lives in GeneratorConfig; the whole dataset is a deterministic
function of the builder's version and config (seed included).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hml_jax.datasets import generated

NUM_LABELS = 10
LABEL_NAMES = tuple(str(d) for d in range(NUM_LABELS))
PARTNER_PAIRS = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9))


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """Every parameter of the generator. The defaults were tuned (README, "The embedded dataset")
  until the default budget's full-label AN baseline landed near 90 test mAP: the clean version
  (no clutter, noise or occlusion) is too easy to tell methods apart, and twice this clutter
  left the small ResNet near 40 mAP."""
  image_size: int = 48
  num_train: int = 10000  # official "train" split; 20% of it becomes validation
  num_test: int = 2000
  seed: int = 0
  test_source_fraction: float = 0.4  # share of each digit class's source images kept for test
  seed_digit_probabilities: tuple = (0.35, 0.4, 0.25)  # P(1, 2 or 3 seed digits)
  partner_probability: float = 0.6  # a seed digit brings its partner along
  min_digit_size: int = 12  # pixels; the 8x8 source digits are rescaled to this range
  max_digit_size: int = 20
  max_distractor_strokes: int = 2  # random line segments, 0..max per image
  max_fragments: int = 1  # halves of non-label digits pasted as clutter, 0..max
  occlusion_probability: float = 0.2  # per digit: a background strip hides 1/4-1/2 of it
  noise_std: float = 0.05  # Gaussian pixel noise (intensities in [0, 1])
  background_gradient: float = 0.15  # amplitude of a random linear background ramp


def split_sources(digit_labels: np.ndarray, test_fraction: float, seed: int):
  """Disjoint source-digit indices (train, test), stratified by digit class."""
  rng = np.random.RandomState(seed)
  train, test = [], []
  for digit in range(NUM_LABELS):
    indices = np.nonzero(digit_labels == digit)[0]
    rng.shuffle(indices)
    num_test = int(round(test_fraction * len(indices)))
    test.extend(indices[:num_test])
    train.extend(indices[num_test:])
  return np.sort(train), np.sort(test)


def sample_with_partners(rng: np.random.RandomState, num_labels: int, pairs, seed_probabilities,
                         partner_probability: float) -> np.ndarray:
  """Labels present in one image: 1, 2, ... seed labels drawn uniformly (with
  seed_probabilities), each bringing its partner of pairs along with partner_probability."""
  partner = {}
  for a, b in pairs:
    partner[a], partner[b] = b, a
  num_seeds = rng.choice(len(seed_probabilities), p=seed_probabilities) + 1
  present = set()
  for label in rng.permutation(num_labels)[:num_seeds]:
    present.add(int(label))
    if rng.uniform() < partner_probability:
      present.add(partner[int(label)])
  return np.array(sorted(present))


def sample_label_set(rng: np.random.RandomState, config: GeneratorConfig) -> np.ndarray:
  """Digits present in one image, with the planted partner co-occurrence."""
  return sample_with_partners(rng, NUM_LABELS, PARTNER_PAIRS, config.seed_digit_probabilities,
                              config.partner_probability)


def _digit_patch(digit_image: np.ndarray, size: int) -> np.ndarray:
  image = Image.fromarray((digit_image / 16.0 * 255).astype(np.uint8))
  return np.asarray(image.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _paste(canvas, patch, top, left):
  height, width = patch.shape
  region = canvas[top:top + height, left:left + width]
  np.maximum(region, patch[:region.shape[0], :region.shape[1]], out=region)


def _stroke(canvas, rng, size):
  """A random line segment of 1-2 px width, ink 0.5-1."""
  start, end = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
  ink = rng.uniform(0.5, 1.0)
  width = rng.choice([1, 2])
  for t in np.linspace(0, 1, 2 * size):
    y, x = (start + t * (end - start)).astype(int)
    canvas[max(0, y):y + width,
           max(0, x):x + width] = np.maximum(canvas[max(0, y):y + width,
                                                    max(0, x):x + width], ink)


def render(rng, digits_present, source_images, source_labels, config: GeneratorConfig):
  """One composite (image_size, image_size) uint8 image holding every digit in digits_present."""
  size = config.image_size
  canvas = np.zeros((size, size), np.float32)
  for digit in digits_present:
    candidates = np.nonzero(source_labels == digit)[0]
    digit_size = rng.randint(config.min_digit_size, config.max_digit_size + 1)
    patch = _digit_patch(source_images[rng.choice(candidates)], digit_size)
    patch *= rng.uniform(0.6, 1.0)
    top, left = rng.randint(0, size - digit_size + 1, 2)
    _paste(canvas, patch, top, left)
    if rng.uniform() < config.occlusion_probability:
      # Hide a strip covering a quarter to a half of the digit with background.
      covered = rng.randint(digit_size // 4, digit_size // 2 + 1)
      if rng.uniform() < 0.5:
        offset = rng.choice([0, digit_size - covered])
        canvas[top + offset:top + offset + covered, left:left + digit_size] = 0.0
      else:
        offset = rng.choice([0, digit_size - covered])
        canvas[top:top + digit_size, left + offset:left + offset + covered] = 0.0
  for _ in range(rng.randint(0, config.max_fragments + 1)):
    # Half of a digit that is *not* a label of this image: clutter that looks like a digit.
    absent = [d for d in range(NUM_LABELS) if d not in set(digits_present)]
    digit = rng.choice(absent)
    candidates = np.nonzero(source_labels == digit)[0]
    digit_size = rng.randint(config.min_digit_size, config.max_digit_size + 1)
    patch = _digit_patch(source_images[rng.choice(candidates)], digit_size)
    half = digit_size // 2
    patch = patch[:half] if rng.uniform() < 0.5 else patch[:, :half]
    top = rng.randint(0, size - patch.shape[0] + 1)
    left = rng.randint(0, size - patch.shape[1] + 1)
    _paste(canvas, patch * rng.uniform(0.5, 1.0), top, left)
  return finish(canvas, rng, config)


def finish(canvas, rng, config: GeneratorConfig):
  """Distractor strokes (0..config.max_distractor_strokes), a random background ramp and
  Gaussian noise on a (size, size) float canvas in [0, 1] -> uint8 image."""
  size = canvas.shape[0]
  for _ in range(rng.randint(0, config.max_distractor_strokes + 1)):
    _stroke(canvas, rng, size)
  ramp = np.linspace(0, 1, size, dtype=np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
  canvas += config.background_gradient * rng.uniform() * (gradient - gradient.min())
  canvas += rng.normal(0, config.noise_std, canvas.shape).astype(np.float32)
  return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)


def generate(split: str, config: GeneratorConfig):
  """Yields (index, image (size, size, 1) uint8, labels (10,) uint8) of one split, in order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  train_sources, test_sources = split_sources(digits.target, config.test_source_fraction,
                                              config.seed)
  sources = {'train': train_sources, 'test': test_sources}[split]
  count = {'train': config.num_train, 'test': config.num_test}[split]
  # Separate streams per split so that changing one split's size never changes the other.
  rng = np.random.RandomState([config.seed, {'train': 1, 'test': 2}[split]])
  for index in range(count):
    present = sample_label_set(rng, config)
    image = render(rng, present, digits.images[sources], digits.target[sources], config)
    labels = np.zeros(NUM_LABELS, np.uint8)
    labels[present] = 1
    yield index, image[:, :, None], labels


class CompositeDigitsConfig(tfds.core.BuilderConfig):

  def __init__(self, *, generator: GeneratorConfig, **kwargs):
    super().__init__(**kwargs)
    self.generator = generator


class CompositeDigits(generated.GeneratedImageBuilder):
  """Cluttered multi-digit composites built offline from sklearn's digits."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'The same pixels, as PNG written by Pillow in array_record files.'
  }
  BUILDER_CONFIGS = [
      CompositeDigitsConfig(name='default',
                            description='48x48, 10,000 train / 2,000 test.',
                            generator=GeneratorConfig()),
      CompositeDigitsConfig(name='tiny',
                            description='32x32, 240 train / 80 test, for tests.',
                            generator=GeneratorConfig(image_size=32,
                                                      num_train=240,
                                                      num_test=80,
                                                      min_digit_size=9,
                                                      max_digit_size=14)),
  ]
  LABEL_NAMES = LABEL_NAMES
  PAIRS = PARTNER_PAIRS
  GENERATE = staticmethod(generate)
  HOMEPAGE = 'https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html'
