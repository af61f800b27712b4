"""What the checkpoint manifest costs at ResNet-50 size (docs/reliability.md).

  PYTHONPATH=. python benchmarks/benchmark_checkpoint_manifest.py [--repeats=3] [--dir=/tmp/x]

Builds the train state of configs/coco.py (ResNet-50, 80 labels, HML, Adam: its parameters,
batch statistics and both moments, 71 M values and 284 MB in 596 arrays), then times, in one
process and alternating so that both see the same disk and page cache:
  save       Checkpointer.save as training calls it (orbax's save, then the manifest:
             SHA-256 of every file the checkpoint holds), and orbax's save alone;
  restore    Checkpointer._restore (the manifest check, then orbax's restore), and orbax's alone.
The difference is the manifest's cost. Prints seconds per call (median of --repeats) and the
ratio. The checkpoint directory is wiped between repeats; the page cache is not dropped, so the
reads are those of a checkpoint just written (the case of a resume right after a preemption is
slower on a cold disk for both alike).
"""
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from hml_jax import methods
from hml_jax import models
from hml_jax.configs import paper
from hml_jax.state import checkpoints
from hml_jax.state import train_state

FLAGS = flags.FLAGS
flags.DEFINE_integer('repeats', 3, 'Timed calls of each kind (the median is printed).')
flags.DEFINE_string('dir', '', 'Where to write the checkpoints (default: a temporary directory).')


def resnet50_state():
  """The paper config's train state with random values (orbax and SHA-256 see every byte)."""
  config = paper.get_config('coco')
  config.init_from = ''
  model = models.create_model(config.model,
                              methods.get_method(config.loss).head, 80)  # COCO's labels
  shapes = train_state.train_state_shapes(train_state.StateSettings.from_config(config), model,
                                          methods.get_method(config.loss),
                                          (config.image_size, config.image_size, 3))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype)
      if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype), shapes)


def timed(function):
  start = time.perf_counter()
  function()
  return time.perf_counter() - start


def main(argv):
  del argv
  state = resnet50_state()
  leaves = jax.tree_util.tree_leaves(state)
  print(f'train state: {sum(x.size for x in leaves) / 1e6:.1f} M values, '
        f'{sum(x.nbytes for x in leaves) / 1e6:.0f} MB in {len(leaves)} arrays; jax '
        f'{jax.__version__}, {os.cpu_count()} CPUs')
  root = FLAGS.dir or tempfile.mkdtemp(prefix='manifest_benchmark_')
  history = {'epochs': [1]}
  times = {key: [] for key in ('save', 'save_orbax', 'restore', 'restore_orbax', 'manifest')}
  for repeat in range(FLAGS.repeats + 1):  # the first round warms up orbax and the disk
    workdir = os.path.join(root, 'run')
    shutil.rmtree(workdir, ignore_errors=True)
    checkpointer = checkpoints.Checkpointer(workdir, keep=10)
    manager = checkpointer.latest
    step_dir = os.path.join(workdir, 'checkpoints', '2')
    measured = {
        'save':
            timed(lambda: checkpointer.save(1, state, history, is_best=False)),
        'save_orbax':
            timed(lambda: manager.save(2, args=checkpointer._args(state, history)) and  # pylint: disable=protected-access
                  manager.wait_until_finished()),
        'manifest':
            timed(lambda: checkpoints.write_manifest(step_dir)),
        'restore':
            timed(lambda: checkpointer._restore(manager, 1, state)),  # pylint: disable=protected-access
    }
    os.remove(os.path.join(step_dir, checkpoints.MANIFEST))  # orbax alone: no check
    measured['restore_orbax'] = timed(lambda: checkpointer._restore(manager, 2, state))  # pylint: disable=protected-access
    if repeat:
      for key, value in measured.items():
        times[key].append(value)
  shutil.rmtree(root, ignore_errors=True)
  median = {key: statistics.median(values) for key, values in times.items()}
  print(f'{"":10s} {"with manifest":>14s} {"orbax alone":>12s} {"ratio":>6s}   (s, median of '
        f'{FLAGS.repeats})')
  for kind in ('save', 'restore'):
    print(f'{kind:10s} {median[kind]:14.2f} {median[kind + "_orbax"]:12.2f} '
          f'{median[kind] / median[kind + "_orbax"]:6.2f}')
  print(f'manifest alone (SHA-256 of every file, written): {median["manifest"]:.2f} s')


if __name__ == '__main__':
  app.run(main)
