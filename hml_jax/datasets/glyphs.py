"""The paper's regime offline: a pretraining source task and a VOC-like target, both generated.

The paper fine-tunes an ImageNet ResNet-50 on VOC / COCO: a backbone pretrained on a large
single-domain source disjoint from the target, and a target with many labels and few positives
per image (VOC: 20 labels, 1.4 positives per image, so single positive labels leave about 2% of
the unobserved labels positive). Neither ImageNet nor VOC can be downloaded here; these two
datasets stand in for them, generated from what the installed packages ship:

- `glyph_pretraining` (the source, as ImageNet): cluttered 32x32 composites of 1-3 printed
  glyphs out of 32 classes (the 26 capital Latin letters and & @ # % ? $), rendered from the
  DejaVu and STIX fonts that matplotlib ships, with full labels. It contains no digit and no
  Greek letter, and never reads scikit-learn's digits: nothing of the target's images or of the
  sources they are drawn from (tests/test_glyphs.py checks it).
- `glyph_digits` (the target, as VOC): 20 labels, the 10 handwritten digits of scikit-learn
  (`load_digits`, as composite_digits) and 10 printed Greek letters (α β γ δ ε ζ θ λ π ω). An
  image starts from one seed label (two with probability 0.25), and each seed brings its planted
  partner (digit d with the d-th Greek letter, PARTNER_PAIRS) with probability 0.35: about 1.7
  positives per image, so that single positive labels leave about 3.6% of the unobserved labels
  positive, and the planted pairs are the ground truth of Eq. 8. Its train and test images draw
  from disjoint source digits and disjoint fonts.

Both are deterministic functions of the builder's version, config and the installed fonts (the
fonts are matplotlib's files; another matplotlib release may shift pixels).
"""
import dataclasses
import functools
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from hml_jax.datasets import composite_digits
from hml_jax.datasets import generated
from hml_jax.runtime import errors

PRETRAINING_CLASSES = tuple('ABCDEFGHIJKLMNOPQRSTUVWXYZ') + ('&', '@', '#', '%', '?', '$')
GREEK_LETTERS = ('α', 'β', 'γ', 'δ', 'ε', 'ζ', 'θ', 'λ', 'π', 'ω')
# glyph_source, the strong source (docs/results.md, "When HML helps"): hundreds of glyph classes
# as ImageNet has a thousand, none of them a target label, nor the capital of one (Γ Δ Θ Λ Π Ω);
# similar-looking classes (Cyrillic Д, ∂) are allowed, as ImageNet's classes overlap VOC's.
LATIN_LETTERS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
SOURCE_CLASSES = (
    tuple(LATIN_LETTERS) + tuple('ηικμνξορστυφχψΞΣΦΨ') +
    tuple('бвгджзийклмнптфцчшщъыьэюяБГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯ') +
    tuple('+−×÷=≠≈≤≥∞∑∫√∂∇∈∩∪⊂⊃∧∨¬∀∃∅←→↑↓↔⇒♠♣♥♦★☆●○■□▲△§¶†‡©®€£¥¢&@#%?$!*~^{}[]()<>/\\|'))
TARGET_LABELS = tuple(str(d) for d in range(10)) + GREEK_LETTERS
PARTNER_PAIRS = tuple((d, 10 + d) for d in range(10))  # digit d with the d-th Greek letter

# matplotlib's fonts that hold every glyph above, by family (serif, sans, mono, STIX).
FONT_FILES = ('DejaVuSans.ttf', 'DejaVuSans-Bold.ttf', 'DejaVuSans-Oblique.ttf',
              'DejaVuSans-BoldOblique.ttf', 'DejaVuSansMono.ttf', 'DejaVuSansMono-Bold.ttf',
              'DejaVuSansMono-Oblique.ttf', 'DejaVuSansMono-BoldOblique.ttf', 'DejaVuSerif.ttf',
              'DejaVuSerif-Bold.ttf', 'DejaVuSerif-Italic.ttf', 'DejaVuSerif-BoldItalic.ttf',
              'STIXGeneral.ttf', 'STIXGeneralBol.ttf', 'STIXGeneralItalic.ttf',
              'STIXGeneralBolIta.ttf')
# The target's test glyphs come from these fonts only, its train glyphs from the others.
TEST_FONTS = ('DejaVuSans-BoldOblique.ttf', 'DejaVuSansMono-Oblique.ttf', 'DejaVuSerif-Italic.ttf',
              'STIXGeneralBol.ttf')
# Computer Modern, for glyph_source's Latin letters only (its other code points are TeX's).
LATIN_ONLY_FONTS = ('cmr10.ttf', 'cmss10.ttf', 'cmtt10.ttf', 'cmti10.ttf', 'cmb10.ttf')
GLYPH_RENDER_SIZE = 40  # points; each glyph is rendered once, then rescaled per use


def font_path(name: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'fonts', 'ttf', name)


@functools.lru_cache(maxsize=None)
def glyph_bank(characters: Tuple[str, ...], fonts: Tuple[str,
                                                         ...]) -> Dict[Tuple[str, str], np.ndarray]:
  """{(character, font): float32 ink image in [0, 1], cropped to the glyph}, rendered once."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  bank = {}
  for name in fonts:
    path = font_path(name)
    if not os.path.isfile(path):
      raise errors.MissingInputError(f'{path}: a font of the glyph datasets is missing (matplotlib '
                                     'ships it; is matplotlib installed whole?).')
    face = ft2font.FT2Font(path)
    font = ImageFont.truetype(path, GLYPH_RENDER_SIZE)
    for character in characters:
      if face.get_char_index(ord(character)) == 0:
        raise errors.InvalidInputError(f'{path} has no glyph for {character!r}.')
      canvas = Image.new('L', (3 * GLYPH_RENDER_SIZE, 3 * GLYPH_RENDER_SIZE))
      ImageDraw.Draw(canvas).text((GLYPH_RENDER_SIZE // 2, GLYPH_RENDER_SIZE // 2),
                                  character,
                                  font=font,
                                  fill=255)
      bank[(character, name)] = np.asarray(canvas.crop(canvas.getbbox()), np.float32) / 255.0
  return bank


def _fit(ink: np.ndarray, size: int, rng: np.random.RandomState) -> np.ndarray:
  """The glyph scaled so that its longer side is size pixels, slightly rotated and sheared."""
  image = Image.fromarray((ink * 255).astype(np.uint8))
  shear = rng.uniform(-0.25, 0.25)
  width, height = image.size
  image = image.transform((width + int(abs(shear) * height), height),
                          Image.AFFINE, (1, shear, -shear * height if shear > 0 else 0, 0, 1, 0),
                          resample=Image.BILINEAR)
  image = image.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
  width, height = image.size
  scale = size / max(width, height)
  image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                       Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def _paste(canvas, patch, rng):
  size = canvas.shape[0]
  top = rng.randint(0, size - patch.shape[0] + 1)
  left = rng.randint(0, size - patch.shape[1] + 1)
  region = canvas[top:top + patch.shape[0], left:left + patch.shape[1]]
  np.maximum(region, patch, out=region)
  return top, left


def _occlude(canvas, top, left, patch_shape, rng, probability):
  if rng.uniform() >= probability:
    return
  height, width = patch_shape
  if rng.uniform() < 0.5:
    covered = rng.randint(height // 4, height // 2 + 1)
    offset = rng.choice([0, height - covered])
    canvas[top + offset:top + offset + covered, left:left + width] = 0.0
  else:
    covered = rng.randint(width // 4, width // 2 + 1)
    offset = rng.choice([0, width - covered])
    canvas[top:top + height, left + offset:left + offset + covered] = 0.0


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
  """Every parameter of both generators (the target's 1.7 positives per image follow from
  seed_label_probabilities and partner_probability)."""
  # Sized so that one fine-tuning run of the target takes about a minute on 2 cores (issue 18):
  # at 48x48 and 4,000 / 2,000 images a run took about 5 minutes (version 1.0.0).
  image_size: int = 32
  num_train: int = 2000
  num_test: int = 1000
  seed: int = 0
  seed_label_probabilities: Sequence[float] = (0.75, 0.25)  # P(1 or 2 seed labels)
  partner_probability: float = 0.35
  min_glyph_size: int = 9  # pixels, the longer side
  max_glyph_size: int = 14
  max_distractor_strokes: int = 2
  occlusion_probability: float = 0.15
  noise_std: float = 0.05
  background_gradient: float = 0.15
  test_source_fraction: float = 0.4  # share of each digit class's sklearn images kept for test
  blocky_probability: float = 0.5  # glyph_source only: share of glyphs drawn as 8x8 blocks


def sample_target_labels(rng: np.random.RandomState, config: GlyphConfig) -> np.ndarray:
  """Labels present in one target image: seeds, each with its planted partner sometimes."""
  return composite_digits.sample_with_partners(rng, len(TARGET_LABELS), PARTNER_PAIRS,
                                               config.seed_label_probabilities,
                                               config.partner_probability)


def generate_target(split: str, config: GlyphConfig):
  """Yields (index, image (size, size, 1) uint8, labels (20,) uint8) of glyph_digits' split."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  train_sources, test_sources = composite_digits.split_sources(digits.target,
                                                               config.test_source_fraction,
                                                               config.seed)
  sources = {'train': train_sources, 'test': test_sources}[split]
  source_images, source_labels = digits.images[sources], digits.target[sources]
  fonts = TEST_FONTS if split == 'test' else tuple(f for f in FONT_FILES if f not in TEST_FONTS)
  bank = glyph_bank(GREEK_LETTERS, fonts)
  count = {'train': config.num_train, 'test': config.num_test}[split]
  rng = np.random.RandomState([config.seed, {'train': 11, 'test': 12}[split]])
  for index in range(count):
    present = sample_target_labels(rng, config)
    canvas = np.zeros((config.image_size,) * 2, np.float32)
    for label in present:
      size = rng.randint(config.min_glyph_size, config.max_glyph_size + 1)
      if label < 10:
        candidates = np.nonzero(source_labels == label)[0]
        patch = composite_digits._digit_patch(  # pylint: disable=protected-access
            source_images[rng.choice(candidates)], size)
      else:
        ink = bank[(GREEK_LETTERS[label - 10], fonts[rng.randint(len(fonts))])]
        patch = _fit(ink, size, rng)
      patch = patch * rng.uniform(0.6, 1.0)
      top, left = _paste(canvas, patch, rng)
      _occlude(canvas, top, left, patch.shape, rng, config.occlusion_probability)
    labels = np.zeros(len(TARGET_LABELS), np.uint8)
    labels[present] = 1
    yield index, composite_digits.finish(canvas, rng, config)[:, :, None], labels


def _compose(split: str, config: GlyphConfig, classes: Sequence[str], stream: int, draw):
  """Yields (index, image, labels (len(classes),) uint8) of a source task: 1-3 labels drawn
  uniformly from classes, each label's patch from draw(label, rng), pasted at a random place
  with a random ink, sometimes occluded, then the clutter of composite_digits.finish. stream
  (the split's random stream is [seed, stream + (0 train, 1 test)]) keeps the sources apart."""
  count = {'train': config.num_train, 'test': config.num_test}[split]
  rng = np.random.RandomState([config.seed, stream + {'train': 0, 'test': 1}[split]])
  for index in range(count):
    present = np.sort(rng.permutation(len(classes))[:rng.randint(1, 4)])
    canvas = np.zeros((config.image_size,) * 2, np.float32)
    for label in present:
      patch = draw(label, rng)
      top, left = _paste(canvas, patch * rng.uniform(0.6, 1.0), rng)
      _occlude(canvas, top, left, patch.shape, rng, config.occlusion_probability)
    labels = np.zeros(len(classes), np.uint8)
    labels[present] = 1
    yield index, composite_digits.finish(canvas, rng, config)[:, :, None], labels


def generate_pretraining(split: str, config: GlyphConfig):
  """Yields (index, image, labels (32,) uint8) of glyph_pretraining: 1-3 glyphs drawn uniformly
  from PRETRAINING_CLASSES, every font (no digit, no Greek letter, no sklearn image)."""
  bank = glyph_bank(PRETRAINING_CLASSES, FONT_FILES)

  def draw(label, rng):
    ink = bank[(PRETRAINING_CLASSES[label], FONT_FILES[rng.randint(len(FONT_FILES))])]
    return _fit(ink, rng.randint(config.min_glyph_size, config.max_glyph_size + 1), rng)

  return _compose(split, config, PRETRAINING_CLASSES, 21, draw)


@functools.lru_cache(maxsize=None)
def source_bank() -> Dict[str, Tuple[np.ndarray, ...]]:
  """{class: its ink images, one per font that has the glyph} for glyph_source."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  faces = {name: ft2font.FT2Font(font_path(name)) for name in FONT_FILES + LATIN_ONLY_FONTS}
  bank = {}
  for character in SOURCE_CLASSES:
    fonts = FONT_FILES + (LATIN_ONLY_FONTS if character in LATIN_LETTERS else ())
    present = tuple(f for f in fonts if faces[f].get_char_index(ord(character)) != 0)
    if not present:
      raise errors.InvalidInputError(f'No font of {fonts} has a glyph for {character!r}.')
    inks = glyph_bank((character,), present)
    bank[character] = tuple(inks[(character, f)] for f in present)
  return bank


def _blocky(ink: np.ndarray, size: int, rng: np.random.RandomState) -> np.ndarray:
  """The glyph as the target's handwritten digits are made: thickened, centred in a square,
  reduced to 8x8 pixels of 17 grey levels (scikit-learn's digits), enlarged bilinearly."""
  image = Image.fromarray((_fit(ink, 24, rng) * 255).astype(np.uint8))
  image = image.filter(ImageFilter.MaxFilter(3))
  side = max(image.size) + 4
  square = Image.new('L', (side, side))
  square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
  small = np.asarray(square.resize((8, 8), Image.BOX), np.float32) / 255.0
  levels = np.round(np.clip(small / max(float(small.max()), 1e-6), 0, 1) * 16)
  return composite_digits._digit_patch(levels, size)  # pylint: disable=protected-access


def generate_source(split: str, config: GlyphConfig):
  """Yields (index, image, labels (190,) uint8) of glyph_source: 1-3 glyphs drawn uniformly from
  SOURCE_CLASSES, a font that has each, printed or (config.blocky_probability) blocky."""
  bank = source_bank()

  def draw(label, rng):
    inks = bank[SOURCE_CLASSES[label]]
    ink = inks[rng.randint(len(inks))]
    size = rng.randint(config.min_glyph_size, config.max_glyph_size + 1)
    if rng.uniform() < config.blocky_probability:
      return _blocky(ink, size, rng)
    return _fit(ink, size, rng)

  return _compose(split, config, SOURCE_CLASSES, 31, draw)


class GlyphBuilderConfig(tfds.core.BuilderConfig):

  def __init__(self, *, generator: GlyphConfig, **kwargs):
    super().__init__(**kwargs)
    self.generator = generator


def _default_and_tiny(num_train: int, num_test: int):
  """Each glyph builder's two configs: 'default' (num_train / num_test images) and 'tiny' (200 /
  80, for tests), 32x32."""
  return [
      GlyphBuilderConfig(name='default',
                         description=f'32x32, {num_train:,} train / {num_test:,} test.',
                         generator=GlyphConfig(num_train=num_train, num_test=num_test)),
      GlyphBuilderConfig(name='tiny',
                         description='32x32, 200 train / 80 test, for tests.',
                         generator=GlyphConfig(num_train=200, num_test=80)),
  ]


class _GlyphBuilder(generated.GeneratedImageBuilder, skip_registration=True):
  """The glyph datasets' version history."""
  VERSION = tfds.core.Version('2.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release: 48x48; glyph_digits 4,000 train / 2,000 test.',
      '2.0.0': '32x32, glyphs 9-14 px; glyph_digits 2,000 train / 1,000 test.',
      '2.1.0': 'The same pixels, as PNG written by Pillow in array_record files.'
  }


class GlyphDigits(_GlyphBuilder):
  """The VOC-like target: 20 labels (handwritten digits, printed Greek letters), ~1.7 per image."""
  LABEL_NAMES = TARGET_LABELS
  PAIRS = PARTNER_PAIRS
  GENERATE = staticmethod(generate_target)
  BUILDER_CONFIGS = _default_and_tiny(2000, 1000)


class GlyphPretraining(_GlyphBuilder):
  """The source task: 32 printed glyph classes, 1-3 per image, full labels."""
  LABEL_NAMES = PRETRAINING_CLASSES
  GENERATE = staticmethod(generate_pretraining)
  BUILDER_CONFIGS = _default_and_tiny(12000, 1000)


class GlyphSource(_GlyphBuilder):
  """The strong source: 190 glyph classes (none a target label), printed or blocky, 1-3 per
  image, full labels (docs/results.md, "When HML helps")."""
  LABEL_NAMES = SOURCE_CLASSES
  GENERATE = staticmethod(generate_source)
  BUILDER_CONFIGS = _default_and_tiny(40000, 2000)
