"""Command line: python -m hml_jax.main --config=configs/default.py --workdir=DIR.

Flags and config only; the work is in train.py. Override any config key on the command line,
e.g. --config.loss=an --config.label_scenario=full.

  --mode=eval --workdir=DIR [--split=test] [--checkpoint=best]: every metric of a trained run
  (hml_jax/tools/evaluate.py), printed and written to DIR/eval_<split>.json; the config comes from DIR.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow; keep its log quiet
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax

from hml_jax.runtime import host
from hml_jax.tools import cli
from hml_jax.tools import evaluate
from hml_jax.training import preemption
from hml_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard logs and '
    'results.json. Running again with the same workdir resumes the run.')
cli.define_config_flag('Training configuration file (train mode).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (or resume) a run, or evaluate '
                  'the checkpoint of a finished one.')
flags.DEFINE_enum('split', 'test', ['train', 'validation', 'test'], 'eval mode: the split.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'eval mode: which checkpoint.')
flags.DEFINE_float('threshold', 0.5, 'eval mode: probability threshold of CP/CR/CF1/OP/OR/OF1.')
flags.DEFINE_string(
    'coordinator_address', '', 'Multi-process: HOST:PORT of process 0 (else '
    'JAX_COORDINATOR_ADDRESS); on a TPU pod set HML_MULTIHOST=1 instead.')
flags.DEFINE_integer('num_processes', 0, 'Multi-process: how many (else JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', -1, 'Multi-process: this one, 0..N-1 (else JAX_PROCESS_ID).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup()
  host.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.mode == 'eval':
    results = evaluate.evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint,
                                        FLAGS.threshold)
    print(evaluate.format_results(results))
    return
  if FLAGS.config is None:
    raise app.UsageError('--config is required to train (e.g. --config=configs/default.py).')
  logging.info('JAX %s: %d process(es), devices %s', jax.__version__, jax.process_count(),
               jax.devices())
  try:
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as stopped:
    logging.warning('%s', stopped)
    sys.exit(143 if stopped.signal_name == 'SIGTERM' else 130)  # 128 + the signal's number
  logging.info('Best epoch %d: val mAP %.2f, test mAP %.2f (last epoch test mAP %.2f). %s',
               results['best_epoch'], results['val_map'], results['test_map'],
               results['last_test_map'], os.path.join(FLAGS.workdir, 'results.json'))


if __name__ == '__main__':
  cli.run(main)
