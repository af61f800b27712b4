"""Command line: python -m hml_jax.main --config=configs/default.py --workdir=DIR.

Flags and config only; the work is in train.py. Override any config key on the command line,
e.g. --config.loss=an --config.label_scenario=full.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow; keep its log quiet

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hml_jax import host
from hml_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and '
                    'results.json. Running again with the same workdir resumes the run.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup()
  logging.info('JAX %s: %d process(es), devices %s', jax.__version__, jax.process_count(),
               jax.devices())
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info('Best epoch %d: val mAP %.2f, test mAP %.2f (last epoch test mAP %.2f). %s',
               results['best_epoch'], results['val_map'], results['test_map'],
               results['last_test_map'], os.path.join(FLAGS.workdir, 'results.json'))


if __name__ == '__main__':
  app.run(main)
