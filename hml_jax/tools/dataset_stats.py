"""The paper's Table 1 row for the data on disk.

  python -m hml_jax.datasets.stats --config=configs/voc.py [--config.dataset.manual_dir=DIR]

Prints: labels, official train / test images, positives per image (train and test), and the
train / validation sizes of Cole et al.'s 80/20 split. Reads labels only (no image is decoded).
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from hml_jax.datasets import registry
from hml_jax.runtime import host
from hml_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  """Defined only when this module runs as a program (no clash with other tools' flags)."""
  cli.define_config_flag('A training configuration.')
  flags.mark_flags_as_required(['config'])


def table_row(source, config):
  """{'dataset', 'labels', 'train', 'test', 'positives_train', 'positives_test', 'train_split',
  'validation_split'} of a Source."""
  num_train = len(source.train_labels)
  num_validation = int(np.round(config.validation_fraction * num_train))
  return {
      'dataset': source.name,
      'labels': int(source.train_labels.shape[1]),
      'train': num_train,
      'test': len(source.test_labels),
      'positives_train': float(np.mean(np.sum(source.train_labels, axis=1))),
      'positives_test': float(np.mean(np.sum(source.test_labels, axis=1))),
      'train_split': num_train - num_validation,
      'validation_split': num_validation,
  }


def format_row(row) -> str:
  return ('| dataset | labels | train images | test images | positives / image (train) | '
          '(test) | protocol train / validation |\n|---|---|---|---|---|---|---|\n'
          f"| {row['dataset']} | {row['labels']} | {row['train']:,} | {row['test']:,} | "
          f"{row['positives_train']:.2f} | {row['positives_test']:.2f} | "
          f"{row['train_split']:,} / {row['validation_split']:,} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup()
  print(format_row(table_row(registry.load_source(FLAGS.config.dataset), FLAGS.config)))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
