"""Datasets: TFDS builders and loaders. Importing a builder module registers it with TFDS."""
import importlib

# The TFDS builders of this package: the embedded datasets (composite digits; the glyph
# pretraining source and VOC-like target) and the paper's four (from the original
# files in TFDS's manual_dir). folder.py and features.py are loaders, not builders.
BUILDER_MODULES = ('composite_digits', 'glyphs', 'voc2012', 'coco2014', 'cub', 'nus_wide')


def register_all() -> None:
  """Imports every builder module, so that tfds.builder(name) finds it."""
  for module in BUILDER_MODULES:
    importlib.import_module(f'{__name__}.{module}')
