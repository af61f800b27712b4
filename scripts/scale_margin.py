"""The paper's Fig. 5 (fixed HML over scale x margin) and adaptive HML from far starts: the runs,
the tables and the heatmap of docs/results.md, section "s* and m* from any start".

  PYTHONPATH=. python scripts/scale_margin.py TABLE [--mode=features|finetune]
      [--data=glyph|composite] [--backbone=embedded:NAME] [--out=$PWD/runs/regime]

TABLE: fig5 (hml_fixed on the scale x margin grid, AN and the default adaptive HML from every start
beside), adaptive (adaptive HML from the starts (5, 0), (10, 0.1), (20, 0.3), (40, 0.5) under
each reading of s*, m*, with s*, m* per epoch), heatmap (docs/fig5_scale_margin.png from the
finished fig5 runs of both modes). Features mode runs on the shipped glyph backbone's features of
glyph_digits (--data=glyph) or of the embedded composites (--data=composite); fine-tuning on
glyph_digits from that backbone. Finished runs are reused (hml_jax.compare), so a table is
printed again without training; the features file's path is in each run's config, so use one
absolute --out throughout.

The design (written before the runs) is in docs/results.md.
"""
import argparse
import os
import sys

if __name__ == '__main__':
  # First thing, before JAX or TensorFlow allocate: restart with a fast malloc (allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

import numpy as np

from hml_jax.runtime import files
from hml_jax.tools import compare
from hml_jax.training import extract_features

SCALES = (5.0, 10.0, 20.0, 30.0, 40.0, 64.0)  # the paper's Fig. 5 axes
MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
STARTS = ((5.0, 0.0), (10.0, 0.1), (20.0, 0.3), (40.0, 0.5))  # adaptive HML's initial (s, m)
PAPER_CELL = (20.0, 0.3)  # the paper's chosen pair (Sec. 4.5, VOC12)
SEEDS = 3
# The learning rates that C1 chose on validation (docs/results.md, "Results of version 2.0.0").
C1_RATES = {'features': {'hml': 1e-2, 'an': 1e-3}, 'finetune': {'hml': 1e-3, 'an': 1e-3}}
# The rates in use: C1_RATES, or with --backbone those of paper_regime.py's c1 table in --out.
RATES = dict(C1_RATES)
# The readings of s*, m* (configs/default.py): the default, log-space s* under Eq. 6 alone, and
# the paper's literal reading.
READINGS = {
    'default': {},
    'log_balance': {
        'adaptive_scale': 'balance'
    },
    'paper': {
        'adaptive_scale': 'balance',
        'adaptive_optimizer': 'separate',
        'adaptive_learning_rate': 1e-3
    },
}
EPOCHS_SHOWN = (1, 2, 5, 10, 25)
HEATMAP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                       'fig5_scale_margin.png')


def base_config(mode, data, out, backbone=''):
  """configs/features.py on the glyph backbone's features of DATA (extracted once into OUT), or
  configs/glyph_digits.py (fine-tuning from that backbone). backbone: an init_from spec for
  glyph_digits ('': the version 2.0.0 tables' contrast, embedded:glyph_resnet_small)."""
  from hml_jax.configs import default, features, glyph_digits  # pylint: disable=g-import-not-at-top
  target = glyph_digits.get_config(glyph_digits.CONTRAST_BACKBONE)
  if backbone:
    if data != 'glyph':
      sys.exit('--backbone applies to glyph_digits only (--data=glyph).')
    glyph_digits.with_backbone(target, backbone)
  if mode == 'finetune':
    if data != 'glyph':
      sys.exit('Fine-tuning runs on glyph_digits only (--data=glyph).')
    return target
  if data == 'glyph':
    source, path = target, os.path.join(out, 'features.npz')
  else:
    source, path = default.get_config(), os.path.join(out, 'composite_features.npz')
    source.init_from = 'embedded:glyph_resnet_small'
  config = features.get_config()
  config.dataset.path = path
  if not os.path.exists(path):
    files.makedirs(out)
    extract_features.extract_initial_to_file(source, path)
  return config


def runs(config, workdir, method, rate, seeds, **overrides):
  """compare.compare of one method at one rate with overrides (finished runs reused): test and
  validation mAP (mean, std over seeds) and each seed's results.json."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in {**overrides, 'learning_rate': rate}.items():
    config[key] = value
  results = compare.seed_results(config, workdir, method, seeds)
  row = {'seeds': seeds, 'results': results}
  for key in ('test_map', 'val_map'):
    values = np.array([r[key] for r in results])
    row[f'{key}_mean'] = float(values.mean())
    row[f'{key}_std'] = float(values.std(ddof=1)) if seeds > 1 else 0.0
  return row


def cell_dir(out, mode, data, scale, margin):
  return os.path.join(out, mode, f'fig5_{data}', f's{scale:g}_m{margin:g}')


def grid_cells(mode):
  """Features mode: every cell. Fine-tuning: the paper's cells (m = 0 at every s; s = 20 and
  s = 40 at every m)."""
  if mode == 'features':
    return [(s, m) for s in SCALES for m in MARGINS]
  return sorted({(s, 0.0) for s in SCALES} | {(s, m) for s in (20.0, 40.0) for m in MARGINS})


def fig5_rows(config, out, mode, data):
  """{(s, m): row} of hml_fixed. Features mode: SEEDS seeds everywhere (one on composite, the
  second data set). Fine-tuning: seed 0, then SEEDS at the best cell by validation and at
  PAPER_CELL."""
  rate = RATES[mode]['hml']
  first = SEEDS if (mode, data) == ('features', 'glyph') else 1
  rows = {
      (s, m):
          runs(config, cell_dir(out, mode, data, s, m), 'hml_fixed', rate, first, scale=s, margin=m)
      for s, m in grid_cells(mode)
  }
  if mode == 'finetune':
    best = max(rows, key=lambda c: rows[c]['val_map_mean'])
    for s, m in {best, PAPER_CELL}:
      rows[(s, m)] = runs(config,
                          cell_dir(out, mode, data, s, m),
                          'hml_fixed',
                          rate,
                          SEEDS,
                          scale=s,
                          margin=m)
  return rows


def start_seeds(mode, reading, start):
  """Features mode: SEEDS everywhere. Fine-tuning: SEEDS for the default from the far starts and
  from PAPER_CELL, seed 0 otherwise."""
  if mode == 'features' or (reading == 'default' and start != (10.0, 0.1)):
    return SEEDS
  return 1


def adaptive_rows(config, out, mode, data, reading):
  rate = RATES[mode]['hml']
  return {
      (s, m):
          runs(config,
               os.path.join(out, mode, f'adaptive_{data}', reading, f's{s:g}_m{m:g}'),
               'hml',
               rate,
               start_seeds(mode, reading, (s, m)),
               scale=s,
               margin=m,
               **READINGS[reading]) for s, m in STARTS
  }


def mean_std(row, key='test_map'):
  return f"{row[f'{key}_mean']:.2f} ± {row[f'{key}_std']:.2f}"


def final_scale_margin(row):
  """Final s*, m* of a row's runs (mean over seeds)."""
  return (np.mean([r['final_scale'] for r in row['results']]),
          np.mean([r['final_margin'] for r in row['results']]))


def fig5(config, out, mode, data):
  rows = fig5_rows(config, out, mode, data)
  print(f'hml_fixed, {mode}, {data}, single positive labels, lr {RATES[mode]["hml"]:g}: '
        'test mAP (mean ± std over seeds; seeds in brackets where not 1), best validation epoch\n')
  print('| s \\ m | ' + ' | '.join(f'{m:g}' for m in MARGINS) + ' |')
  print('|---' * (len(MARGINS) + 1) + '|')
  best = max(rows, key=lambda c: rows[c]['val_map_mean'])
  for s in SCALES:
    cells = []
    for m in MARGINS:
      row = rows.get((s, m))
      if row is None:
        cells.append('')
        continue
      text = mean_std(row) if row['seeds'] > 1 else f"{row['test_map_mean']:.2f}"
      text += f" ({row['seeds']})" if row['seeds'] > 1 and mode == 'finetune' else ''
      cells.append(f'**{text}**' if (s, m) == best else text)
    print(f'| {s:g} | ' + ' | '.join(cells) + ' |')
  print(f'\nBest cell by validation mAP: (s, m) = ({best[0]:g}, {best[1]:g}), validation '
        f"{rows[best]['val_map_mean']:.2f}.\n")
  an = runs(config, os.path.join(out, mode, f'fig5_{data}', 'an'), 'an', RATES[mode]['an'], SEEDS)
  print('| beside | test mAP | final s\\*, m\\* |')
  print('|---|---|---|')
  print(f'| AN (lr {RATES[mode]["an"]:g}, {SEEDS} seeds) | {mean_std(an)} | |')
  for (s, m), row in adaptive_rows(config, out, mode, data, 'default').items():
    scale, margin = final_scale_margin(row)
    print(
        f'| adaptive HML (default) from ({s:g}, {m:g}), {row["seeds"]} seed(s) | {mean_std(row)} | '
        f'{scale:.2f}, {margin:.3f} |')
  files.write_json(
      os.path.join(out, mode, f'fig5_{data}', 'fig5.json'), {
          f'{s:g},{m:g}': {
              k: row[k] for k in ('test_map_mean', 'test_map_std', 'val_map_mean', 'seeds')
          } for (s, m), row in rows.items()
      })


def adaptive(config, out, mode, data):
  readings = list(READINGS) if mode == 'features' else ['default', 'paper']
  print(f'Adaptive HML, {mode}, {data}, single positive labels, lr {RATES[mode]["hml"]:g}: '
        'test mAP (mean ± std), validation mAP, final s\\*, m\\* (mean over seeds)\n')
  print('| reading | start (s, m) | seeds | test mAP | val mAP | final s\\* | final m\\* |')
  print('|---|---|---|---|---|---|---|')
  trajectories = {}
  for reading in readings:
    for (s, m), row in adaptive_rows(config, out, mode, data, reading).items():
      scale, margin = final_scale_margin(row)
      print(f'| {reading} | ({s:g}, {m:g}) | {row["seeds"]} | {mean_std(row)} | '
            f'{mean_std(row, "val_map")} | {scale:.2f} | {margin:.3f} |')
      first = row['results'][0]['epochs']
      trajectories[(reading, s, m)] = {e['epoch']: (e['scale'], e['margin']) for e in first}
  shown = [e for e in EPOCHS_SHOWN if e <= config.num_epochs]
  print('\ns\\*, m\\* at the end of epochs ' + ', '.join(map(str, shown)) + ' (seed 0)\n')
  print('| reading | start | ' + ' | '.join(f'epoch {e}' for e in shown) + ' |')
  print('|---|---' + '|---' * len(shown) + '|')
  for (reading, s, m), by_epoch in trajectories.items():
    print(f'| {reading} | ({s:g}, {m:g}) | ' + ' | '.join(
        f'{by_epoch[e][0]:.2f}, {by_epoch[e][1]:.2f}' for e in shown if e in by_epoch) + ' |')


def heatmap(out):
  """docs/fig5_scale_margin.png: test mAP over scale x margin, features mode and fine-tuning."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  panels = []
  for mode, data in (('features', 'glyph'), ('features', 'composite'), ('finetune', 'glyph')):
    path = os.path.join(out, mode, f'fig5_{data}', 'fig5.json')
    if os.path.exists(path):
      panels.append((mode, data, files.read_json(path)))
  if not panels:
    sys.exit(f'No fig5.json under {out}: run the fig5 table first.')
  figure, axes = pyplot.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
  for axis, (mode, data, cells) in zip(axes[0], panels):
    grid = np.full((len(SCALES), len(MARGINS)), np.nan)
    for key, row in cells.items():
      s, m = map(float, key.split(','))
      grid[SCALES.index(s), MARGINS.index(m)] = row['test_map_mean']
    image = axis.imshow(grid, cmap='viridis', origin='lower', aspect='auto')
    for i in range(len(SCALES)):
      for j in range(len(MARGINS)):
        if not np.isnan(grid[i, j]):
          axis.text(j,
                    i,
                    f'{grid[i, j]:.1f}',
                    ha='center',
                    va='center',
                    fontsize=8,
                    color='white' if grid[i, j] < np.nanmean(grid) else 'black')
    axis.set_xticks(range(len(MARGINS)), [f'{m:g}' for m in MARGINS])
    axis.set_yticks(range(len(SCALES)), [f'{s:g}' for s in SCALES])
    axis.set_xlabel('margin m')
    axis.set_ylabel('scale s')
    axis.set_title(
        f'hml_fixed, {"features" if mode == "features" else "fine-tuning"}, {data}\n'
        'test mAP, single positive labels',
        fontsize=9)
    figure.colorbar(image, ax=axis, shrink=0.8)
  figure.tight_layout()
  figure.savefig(HEATMAP, dpi=110)
  print(f'Wrote {HEATMAP}.')


TABLES = {'fig5': fig5, 'adaptive': adaptive}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('table', choices=[*TABLES, 'heatmap'])
  parser.add_argument('--mode', choices=['features', 'finetune'], default='features')
  parser.add_argument('--data', choices=['glyph', 'composite'], default='glyph')
  parser.add_argument('--out', default=os.path.abspath('runs/regime'))
  parser.add_argument('--backbone',
                      default='',
                      help="init_from of glyph_digits's backbone; the rates are then those of "
                      "paper_regime.py c1 --backbone=... in the same --out")
  args = parser.parse_args()
  from hml_jax.runtime import host  # pylint: disable=g-import-not-at-top
  host.setup()
  out = os.path.abspath(args.out)
  if args.backbone:
    table = os.path.join(out, args.mode, 'c1', 'table.json')
    if not os.path.exists(table):
      sys.exit(f'{table} is missing: run paper_regime.py c1 --mode={args.mode} '
               f'--backbone={args.backbone} --out={out} first.')
    RATES[args.mode] = {
        m: files.read_json(table)['table'][m]['learning_rate'] for m in ('hml', 'an')
    }
  if args.table == 'heatmap':
    heatmap(out)
  else:
    TABLES[args.table](base_config(args.mode, args.data, out, args.backbone), out, args.mode,
                       args.data)


if __name__ == '__main__':
  main()
