"""Compare methods on the same data, protocol and seeds; optionally sweep hyperparameters.

  python -m hml_jax.compare --config=configs/default.py --methods=an,an_ls,wan,epr,role,hml \
      --seeds=3 --workdir=runs/compare [--learning_rates=1e-2,1e-3,1e-4 --batch_sizes=8,16]

Each (method, learning rate, batch size, seed) trains in its own workdir below --workdir, so a
run that already finished is reused and an interrupted one resumes. For each method the
(learning rate, batch size) with the best mean validation mAP is selected, as in the paper's grid
search, and its test mAP is reported: workdir/table.md (method x dataset, mean ± std over seeds,
shaped like the paper's Table 2) and workdir/table.json (every run).
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import numpy as np

from hml_jax import methods
from hml_jax.data import labels as labels_lib
from hml_jax.runtime import files
from hml_jax.runtime import host
from hml_jax.state import workdir_files
from hml_jax.tools import cli
from hml_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Root directory of all runs and of table.md / table.json.')
flags.DEFINE_list('methods', ['an', 'hml'], 'config.loss names to compare.')
flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. seeds-1 for every method.')
flags.DEFINE_list('learning_rates', [], 'Learning rates to sweep (default: the config\'s).')
flags.DEFINE_list('batch_sizes', [], 'Batch sizes to sweep (default: the config\'s).')
flags.DEFINE_integer(
    'grid_seeds', None, 'Seeds per sweep point before the choice; the other '
    'seeds train at the chosen point only (default: all seeds everywhere).')
cli.define_config_flag('Base training configuration.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_name(method, learning_rate, batch_size, seed):
  return f'{method}/lr{learning_rate:g}_bs{batch_size}/seed{seed}'


def train_or_reuse(config, workdir):
  """results.json of a finished run in workdir, else trains (or resumes) it. A workdir made with
  another config (say another label scenario under the same --workdir) is refused, not reused."""
  path = files.join(workdir, 'results.json')
  if files.exists(path):
    workdir_files.check_config(workdir, config)
    results = files.read_json(path)
    if len(results['epochs']) == config.num_epochs or results.get('stopped_early'):
      logging.info('Reusing %s.', workdir)
      return results
  return train.train_and_evaluate(config, workdir)


def best_points(runs):
  """Per method: the (learning rate, batch size) with the best mean validation mAP."""
  best = {}
  for method in dict.fromkeys(run['method'] for run in runs):
    points = {}
    for run in runs:
      if run['method'] == method:
        points.setdefault((run['learning_rate'], run['batch_size']), []).append(run['val_map'])
    best[method] = max(points, key=lambda point: np.mean(points[point]))
  return best


def _mean(runs, key):
  values = [r.get(key) for r in runs]
  return None if any(v is None for v in values) else float(np.mean(values))


def _mean_std(runs, key, method):
  """(mean, sample std) of a learned s* or m* over runs; None for a method without them."""
  values = [r.get(key) for r in runs]
  if not method.has_scale_and_margin or any(v is None for v in values):
    return None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _format(value, spec='.2f'):
  if value is None:
    return '—'
  if isinstance(value, tuple):
    return f'{value[0]:{spec}} ± {value[1]:{spec}}'
  return f'{value:{spec}}'


def summarize(runs, config, chosen_points=None):
  """Per method: the sweep point with the best mean validation mAP (or chosen_points[method])
  and its test mAP over the seeds run there."""
  table = {}
  chosen_points = chosen_points or best_points(runs)
  for method in dict.fromkeys(run['method'] for run in runs):
    learning_rate, batch_size = chosen_points[method]
    chosen = [
        run for run in runs
        if run['method'] == method and (run['learning_rate'], run['batch_size']) == (learning_rate,
                                                                                     batch_size)
    ]
    test = np.array([r['test_map'] for r in chosen])
    table[method] = {
        'best_epochs': [r.get('best_epoch') for r in chosen],  # runs of older table.json lack it
        'final_scale': _mean_std(chosen, 'final_scale', methods.get_method(method)),
        'final_margin': _mean_std(chosen, 'final_margin', methods.get_method(method)),
        'train_images_per_sec': _mean(chosen, 'train_images_per_sec'),
        'wall_seconds': _mean(chosen, 'wall_seconds'),
        'learning_rate': learning_rate,
        'batch_size': batch_size,
        'seeds': len(chosen),
        'val_map': float(np.mean([r['val_map'] for r in chosen])),
        'test_map_mean': float(test.mean()),
        'test_map_std': float(test.std(ddof=1)) if len(test) > 1 else 0.0,
        'last_test_map_mean': float(np.mean([r['last_test_map'] for r in chosen])),
    }
  scenario = labels_lib.scenario_name(config.label_scenario, config.positive_fraction)
  dataset = f'{config.dataset.name} ({scenario})'
  lines = [
      f'| method | {dataset} | lr | batch | seeds | val mAP | last-epoch test mAP | best epochs | '
      'final s* | final m* | train img/s | wall s |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|'
  ]
  for method, row in table.items():
    lines.append(f"| {method} | {row['test_map_mean']:.2f} ± {row['test_map_std']:.2f} | "
                 f"{row['learning_rate']:g} | {row['batch_size']} | {row['seeds']} | "
                 f"{row['val_map']:.2f} | {row['last_test_map_mean']:.2f} | "
                 f"{', '.join(str(e) for e in row['best_epochs'])} | "
                 f"{_format(row['final_scale'])} | {_format(row['final_margin'])} | "
                 f"{_format(row['train_images_per_sec'], '.0f')} | "
                 f"{_format(row['wall_seconds'], '.0f')} |")
  return table, '\n'.join(lines) + '\n'


def compare(config,
            workdir,
            method_names,
            seeds,
            learning_rates=(),
            batch_sizes=(),
            grid_seeds=None):
  """Trains every combination (reusing finished runs), writes table.md / table.json.

  grid_seeds: if set, every sweep point trains seeds 0 .. grid_seeds-1 only, the point is chosen
  by their mean validation mAP, and seeds grid_seeds .. seeds-1 then train at the chosen point
  alone (a cheaper protocol for large sweeps; the choice still sees validation mAP only).
  """
  for method in method_names:
    methods.get_method(method)  # unknown names fail before any training
  learning_rates = [float(x) for x in learning_rates] or [config.learning_rate]
  batch_sizes = [int(x) for x in batch_sizes] or [config.batch_size]
  grid_seeds = seeds if grid_seeds is None else min(grid_seeds, seeds)

  def run(method, learning_rate, batch_size, seed):
    run_config = config.copy_and_resolve_references()
    run_config.unlock()
    run_config.loss, run_config.seed = method, seed
    run_config.learning_rate, run_config.batch_size = learning_rate, batch_size
    name = run_name(method, learning_rate, batch_size, seed)
    results = train_or_reuse(run_config, files.join(workdir, name))
    return {
        'method': method,
        'learning_rate': learning_rate,
        'batch_size': batch_size,
        'seed': seed,
        'run': name,
        **{
            key: results[key] for key in ('val_map', 'test_map', 'last_test_map', 'best_epoch')
        },
        # s*, m* (None for a method without them) and the speed, as the run's results.json has
        # them (an older results.json may lack one: then None).
        **{
            key: results.get(key) for key in ('final_scale', 'final_margin', 'train_images_per_sec', 'wall_seconds')
        },
    }

  runs = [
      run(method, learning_rate, batch_size, seed)
      for method in method_names
      for learning_rate in learning_rates
      for batch_size in batch_sizes
      for seed in range(grid_seeds)
  ]
  chosen_points = best_points(runs)
  for method in method_names:
    runs.extend(run(method, *chosen_points[method], seed) for seed in range(grid_seeds, seeds))
  table, markdown = summarize(runs, config, chosen_points)
  files.write_text(files.join(workdir, 'table.md'), markdown)
  files.write_json(files.join(workdir, 'table.json'), {
      'table': table,
      'runs': runs,
      'config': config.to_dict(),
      'grid_seeds': grid_seeds
  },
                   default=list)
  return table, markdown


def seed_results(config, workdir, method, seeds):
  """compare() of one method at config's learning rate and batch size (finished runs reused):
  the results.json of seeds 0 .. seeds-1, in order."""
  compare(config, workdir, [method], seeds)
  return [
      files.read_json(
          files.join(workdir, run_name(method, config.learning_rate, config.batch_size, seed),
                     'results.json')) for seed in range(seeds)
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host.setup()
  _, markdown = compare(FLAGS.config, FLAGS.workdir, FLAGS.methods, FLAGS.seeds,
                        FLAGS.learning_rates, FLAGS.batch_sizes, FLAGS.grid_seeds)
  print(markdown)


if __name__ == '__main__':
  cli.run(main)
