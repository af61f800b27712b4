"""Your own images: --config.dataset.path=DIR with DIR/train.csv (and optionally test.csv), each
`filename,labels` (hml_jax/datasets/folder.py). Otherwise the paper's setting (configs/paper.py)."""
from hml_jax.configs import paper


def get_config():
  config = paper.get_config('folder')
  config.dataset.path = ''  # the folder holding train.csv; required
  config.dataset.skip_corrupt = False  # True: skip images that do not decode, and count them
  config.dataset.test_fraction = 0.2  # without test.csv: this share of train.csv is the test
  config.dataset.test_seed = 0
  # True lets CSV filenames leave config.dataset.path ('../x.png', '/abs/x.png').
  config.dataset.allow_outside_paths = False
  return config
