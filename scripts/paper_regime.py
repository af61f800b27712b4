"""The paper's claims in its regime, offline: one command per table of docs/results.md.

  PYTHONPATH=. python scripts/paper_regime.py TABLE [--mode=features|finetune] [--out=runs/regime]
      [--backbone=embedded:NAME] [--fractions=0.1,0.5,0.9] [--methods=hml,an,...]

TABLE: pretraining (the source run of the embedded backbone, checked against the committed file), c1 (single positive labels: every
method, learning rate from the paper's grid by validation mAP), c2 (partial positive labels),
c3 (full labels), c4 (adaptive / fixed s, m / normalized sigmoid / AN), c5 (margin placement),
c6 (Eq. 8: where the planted pairs rank). c2-c6 use HML's and AN's (= BCE's) learning rates
chosen in c1 of the same mode, so c1 runs first. Finished runs are reused (hml_jax.compare);
each table is printed in markdown with the paper's VOC12 numbers beside ours.

The design (written before the runs) is in docs/results.md, "The paper's regime, offline".
"""
import argparse
import os
import sys

if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

import numpy as np

from hml_jax.configs import glyph_digits
from hml_jax.datasets import glyphs
from hml_jax.init_from import embedded
from hml_jax.models import heads
from hml_jax.runtime import files
from hml_jax.state import train_state
from hml_jax.tools import analyze, compare
from hml_jax.training import extract_features

SEEDS = 3
# A method whose C1 test mAP is within NEAR_IN_STDS times the larger of the two stds of HML's
# gets MORE_SEEDS (and so does HML): "5 seeds where the spread is near the difference".
MORE_SEEDS, NEAR_IN_STDS = 5, 2.0
# Seeds per learning rate of the grid before the choice (docs/results.md): fine-tuning runs the
# grid on seed 0, then seeds 1 and 2 at the chosen rate; features mode (seconds per run) runs
# every point with every seed.
GRID_SEEDS = {'finetune': 1, 'features': SEEDS}
# The version 2.0.0 tables' backbone, the weaker contrast (configs/glyph_digits.py's default is
# the strong backbone of "When HML helps", run with --backbone=embedded:NAME and its own --out).
CONTRAST = f'embedded:{glyph_digits.CONTRAST_BACKBONE}'
GRID = (1e-2, 1e-3, 1e-4, 1e-5)  # the paper's learning-rate grid (Sec. 4.1)
FEATURE_METHODS = ('an', 'an_ls', 'wan', 'epr', 'role', 'em', 'em_apl', 'll_r', 'll_ct', 'll_cp',
                   'asl', 'hml')
FINETUNE_METHODS = ('an', 'an_ls', 'wan', 'epr', 'role', 'em', 'll_r', 'hml')
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
# The paper's VOC12 numbers (mAP): Table 2 (single positive), 3 (full), 4 (ablation), 5 (margin).
PAPER_SINGLE_POSITIVE = {
    'an': 85.1,
    'an_ls': 86.7,
    'wan': 86.5,
    'epr': 85.5,
    'role': 87.9,
    'hml': 89.1,
    'em': 89.09,
    'em_apl': 89.19,
    'll_r': 89.2,
    'll_ct': 89.0,
    'll_cp': 88.4
}  # EM / LL: Zhou et al., Kim et al. (REFERENCES.md)
PAPER_FULL = {'bce': 89.1, 'hml': 91.3}
PAPER_ABLATION = {'an': 86.9, 'hml_fixed': 89.1, 'hml': 89.1}  # Table 4, single positive
PAPER_MARGIN = {'none': 88.0, 'positives': 83.4, 'negatives': 88.2, 'both': 89.1}


def base_config(mode, out, backbone=CONTRAST):
  """configs/features.py on the backbone's features of glyph_digits (extracted once into
  OUT/features.npz), or configs/glyph_digits.py (fine-tuning from that backbone). backbone: an
  init_from spec."""
  target = glyph_digits.with_backbone(glyph_digits.get_config(), backbone)
  if mode == 'finetune':
    return target
  from hml_jax.configs import features  # pylint: disable=g-import-not-at-top
  config = features.get_config()
  config.dataset.path = os.path.join(out, 'features.npz')
  if not os.path.exists(config.dataset.path):
    files.makedirs(out)
    extract_features.extract_initial_to_file(target, config.dataset.path)
  return config


def pretraining(out):
  """The source run of the embedded backbone (configs/glyph_pretraining.py), its epochs, and
  whether its backbone is the committed file bit for bit."""
  from hml_jax.configs import glyph_pretraining  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(out, 'pretraining')
  results = compare.train_or_reuse(glyph_pretraining.get_config(), workdir)
  print('| epoch | source val mAP | source test mAP |')
  print('|---|---|---|')
  for epoch in results['epochs']:
    print(f"| {epoch['epoch']} | {epoch['val_map']:.2f} | {epoch['test_map']:.2f} |")
  exported = os.path.join(out, 'glyph_resnet_small.safetensors')
  embedded.export_workdir(workdir, exported)
  committed = embedded.path_of('glyph_resnet_small')
  same = (os.path.exists(committed) and
          embedded.sha256_of(exported) == embedded.sha256_of(committed))
  print(f"Best epoch {results['best_epoch']}: source val mAP {results['val_map']:.2f}, test mAP "
        f"{results['test_map']:.2f}, {results['wall_seconds']:.0f} s. Its backbone, {exported} "
        f"(SHA-256 {embedded.sha256_of(exported)}), is "
        f"{'bitwise the same as' if same else 'NOT the same as'} {committed}.")


def grid(config, out, name, methods, learning_rates=GRID, grid_seeds=None, **overrides):
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in overrides.items():
    config[key] = value
  return compare.compare(config,
                         os.path.join(out, name),
                         methods,
                         SEEDS,
                         learning_rates,
                         grid_seeds=grid_seeds)


def cell(row):
  return f"{row['test_map_mean']:.2f} ± {row['test_map_std']:.2f}"


def near_hml(table):
  """Methods of a C1 table (of SEEDS seeds each) whose test mAP is near HML's: the difference is
  under NEAR_IN_STDS times the larger std of the two (HML included if any is)."""
  hml = table['hml']
  near = [
      method for method, row in table.items()
      if method != 'hml' and abs(row['test_map_mean'] - hml['test_map_mean']) < NEAR_IN_STDS *
      max(row['test_map_std'], hml['test_map_std'])
  ]
  return ['hml', *near] if near else []


def c1_table(config, out, mode, methods):
  """compare on the grid (GRID_SEEDS[mode] per point, then SEEDS at the chosen rate), then MORE_SEEDS
  for the methods near HML; writes the merged OUT/MODE/c1/table.json."""
  table, _ = grid(config, os.path.join(out, mode), 'c1', methods, grid_seeds=GRID_SEEDS[mode])
  more = near_hml(table) if 'hml' in table else []
  if more:
    workdir = os.path.join(out, mode, 'c1')
    first_runs = files.read_json(os.path.join(workdir, 'table.json'))['runs']
    # The same grid seeds as above, so the extra seeds run at the rate already chosen.
    seeded, _ = compare.compare(config,
                                workdir,
                                more,
                                MORE_SEEDS,
                                GRID,
                                grid_seeds=GRID_SEEDS[mode])
    table.update(seeded)
    merged = files.read_json(os.path.join(workdir, 'table.json'))
    known = {run['run'] for run in merged['runs']}
    merged['runs'] += [run for run in first_runs if run['run'] not in known]
    merged['table'] = table
    files.write_json(os.path.join(workdir, 'table.json'), merged)
  return table


def c1(config, out, mode, methods_flag=''):
  """methods_flag: 'hml,an,...' runs (and tabulates) those methods only, in that order."""
  methods = FEATURE_METHODS if mode == 'features' else FINETUNE_METHODS
  if methods_flag:
    methods = [method for method in methods_flag.split(',') if method]
  table = c1_table(config, out, mode, methods)
  runs = files.read_json(os.path.join(out, mode, 'c1', 'table.json'))['runs']
  grid_seeds = range(GRID_SEEDS[mode])

  def grid_column(method):
    """Mean validation mAP at each rate of the grid, over the seeds the choice saw."""
    means = []
    for rate in GRID:
      chosen_from = [
          run['val_map']
          for run in runs
          if run['method'] == method and run['learning_rate'] == rate and run['seed'] in grid_seeds
      ]
      means.append(f'{np.mean(chosen_from):.2f}')
    return ' / '.join(means)

  print('| method | ours: test mAP | seeds | lr (by val) | val mAP | val mAP at '
        f"{' / '.join(f'{rate:g}' for rate in GRID)} | paper, VOC12 |")
  print('|---|---|---|---|---|---|---|')
  for method, row in table.items():
    print(f"| {method} | {cell(row)} | {row['seeds']} | {row['learning_rate']:g} | "
          f"{row['val_map']:.2f} | {grid_column(method)} | "
          f"{PAPER_SINGLE_POSITIVE.get(method, '—')} |")


def c1_rows(out, mode):
  path = os.path.join(out, mode, 'c1', 'table.json')
  if not os.path.exists(path):
    sys.exit(f'{path} is missing: run the c1 table of --mode={mode} first.')
  return files.read_json(path)['table']


def chosen_rates(out, mode):
  return {method: row['learning_rate'] for method, row in c1_rows(out, mode).items()}


def by_method_rate(config, out, mode, name, methods, **overrides):
  """One compare per method at its c1 learning rate (AN's for BCE). A method that c1 ran with
  the same config (no overrides) is read from c1's table: the same runs, not trained twice."""
  c1_table_rows = c1_rows(out, mode)
  rates = {method: row['learning_rate'] for method, row in c1_table_rows.items()}
  rows = {}
  for method in methods:
    if not overrides and method in c1_table_rows:
      rows[method] = c1_table_rows[method]
      continue
    rate = rates['an' if method == 'bce' else method if method in rates else 'hml']
    table, _ = grid(config, os.path.join(out, mode, name), f'{method}', [method], (rate,),
                    **overrides)
    rows[method] = table[method]
  return rows


def c2(config, out, mode, fractions=FRACTIONS):
  print('| positive labels kept | BCE | HML | HML − BCE |')
  print('|---|---|---|---|')
  for fraction in fractions:
    rows = by_method_rate(config,
                          out,
                          mode,
                          f'c2/{int(100 * fraction)}', ('bce', 'hml'),
                          label_scenario='partial_positive',
                          positive_fraction=fraction)
    print(f"| {100 * fraction:.0f}% | {cell(rows['bce'])} | {cell(rows['hml'])} | "
          f"{rows['hml']['test_map_mean'] - rows['bce']['test_map_mean']:+.2f} |")


def c3(config, out, mode):
  rows = by_method_rate(config, out, mode, 'c3', ('bce', 'hml'), label_scenario='full')
  print('| method | ours: test mAP (full labels) | paper, VOC12 |')
  print('|---|---|---|')
  for method, row in rows.items():
    print(f'| {method} | {cell(row)} | {PAPER_FULL[method]} |')


def c4(config, out, mode):
  rows = by_method_rate(config, out, mode, 'c4', ('an', 'normalized_sigmoid', 'hml_fixed', 'hml'))
  print('| variant | ours: test mAP | paper, VOC12 (Tables 4, 5) |')
  print('|---|---|---|')
  paper = {**PAPER_ABLATION, 'normalized_sigmoid': PAPER_MARGIN['none']}
  for method, row in rows.items():
    print(f'| {method} | {cell(row)} | {paper[method]} |')


def c5(config, out, mode):
  print('| margin on | ours: test mAP | paper, VOC12 (Table 5) |')
  print('|---|---|---|')
  for margin_on in ('none', 'positives', 'negatives', 'both'):
    # 'both' is HML as c1 ran it: read from c1's table.
    overrides = {} if margin_on == 'both' else {'margin_on': margin_on}
    rows = by_method_rate(config, out, mode, f'c5/{margin_on}', ('hml',), **overrides)
    print(f"| {margin_on} | {cell(rows['hml'])} | {PAPER_MARGIN[margin_on]} |")


def planted_ranks(workdir):
  config, method, state = train_state.load_trained_state(workdir, 'best')
  scale, margin = (float(x) for x in train_state.scale_and_margin(
      state.params, train_state.StateSettings.from_config(config), method))
  correlation = np.asarray(
      heads.label_correlation(analyze.label_embeddings(state.params, method), scale, margin))
  return sorted(analyze.pair_ranks(correlation, glyphs.PARTNER_PAIRS).values())


def c6(config, out, mode):
  """Eq. 8 on HML's c1 (single positive) and c3 (full labels) runs, seed by seed."""
  rate = chosen_rates(out, mode)['hml']
  print(f'| labels | seed | ranks of the {len(glyphs.PARTNER_PAIRS)} planted pairs among '
        f'{20 * 19 // 2} |')
  print('|---|---|---|')
  for labels, name in (('single positive', 'c1'), ('full', 'c3/hml')):
    for seed in range(SEEDS):
      workdir = os.path.join(out, mode, name, compare.run_name('hml', rate, config.batch_size,
                                                               seed))
      if not files.exists(workdir):
        sys.exit(f'{workdir} is missing: run the c1 and c3 tables first.')
      print(f'| {labels} | {seed} | {planted_ranks(workdir)} |')


TABLES = {'c1': c1, 'c2': c2, 'c3': c3, 'c4': c4, 'c5': c5, 'c6': c6}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('table', choices=['pretraining', *TABLES])
  parser.add_argument('--mode', choices=['features', 'finetune'], default='features')
  parser.add_argument('--out', default='runs/regime')
  parser.add_argument('--backbone',
                      default=CONTRAST,
                      help="init_from of the target's backbone (default: the version 2.0.0 "
                      "tables' contrast); use one --out per backbone")
  parser.add_argument('--fractions',
                      default=','.join(f'{f:g}' for f in FRACTIONS),
                      help='c2 only: the kept fractions of positive labels')
  parser.add_argument('--methods',
                      default='',
                      help='c1 only: a comma-separated subset, run in '
                      'that order (default: every method of the mode)')
  args = parser.parse_args()
  from hml_jax.runtime import host  # pylint: disable=g-import-not-at-top
  host.setup()
  if args.table == 'pretraining':
    pretraining(args.out)
    return
  config = base_config(args.mode, args.out, args.backbone)
  if args.table == 'c1':
    c1(config, args.out, args.mode, args.methods)
  elif args.table == 'c2':
    c2(config, args.out, args.mode, [float(f) for f in args.fractions.split(',') if f])
  else:
    TABLES[args.table](config, args.out, args.mode)


if __name__ == '__main__':
  main()
