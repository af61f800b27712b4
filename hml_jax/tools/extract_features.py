"""Command line: backbone features of a dataset's official train and test splits, for features mode.

  python -m hml_jax.extract_features --workdir=RUN --output=features.npz [--which=best]
  python -m hml_jax.extract_features --config=configs/glyph_digits.py --output=features.npz

RUN is a training workdir: its config.json names the dataset and its best (or latest)
checkpoint gives the backbone. With --config instead, the backbone is the one a run of that
config starts from (config.init_from: ImageNet weights, an embedded backbone, another run's),
before any training, on the config's dataset. The .npz holds train_features / train_labels (the
official train split in its official order, so features mode applies Cole et al.'s protocol to
the same rows), test_features / test_labels and label_names: what configs/features.py reads.
Images are resized as for evaluation, without flips. --config.dataset.* overrides (e.g.
manual_dir) go through --dataset_override=key=value with --workdir, or --config.dataset.KEY=...
with --config.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from hml_jax.runtime import host
from hml_jax.tools import cli
from hml_jax.training.extract_features import extract_initial_to_file, extract_to_file

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when this module runs as a program (so that importing it
  next to another tool's flags does not clash)."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose backbone extracts the features.')
  cli.define_config_flag('Instead of --workdir: the backbone a run of this config starts from '
                         '(config.init_from), on its dataset.')
  flags.DEFINE_string('output', None, 'Path of the .npz to write.')
  flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'Which checkpoint of the workdir.')
  flags.DEFINE_integer('batch_size', 64, 'Images per forward pass (a multiple of the devices).')
  flags.DEFINE_list(
      'dataset_override', [], 'config.dataset entries to change, key=value (e.g. '
      'data_dir=/data/tfds,manual_dir=/data/voc).')
  flags.mark_flags_as_required(['output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if (FLAGS.workdir is None) == (FLAGS.config is None):
    raise app.UsageError('Give exactly one of --workdir (a trained run) and --config (the '
                         'backbone a run of that config starts from).')
  host.setup()
  if FLAGS.config is not None:
    extract_initial_to_file(FLAGS.config, FLAGS.output, FLAGS.batch_size)
  else:
    extract_to_file(FLAGS.workdir, FLAGS.output, FLAGS.which, FLAGS.batch_size,
                    FLAGS.dataset_override)
  print(f'Wrote {FLAGS.output}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
