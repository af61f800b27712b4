"""Features mode and feature scale: why linear-head baselines collapse on large features, and
what standardization does (docs/results.md, "Features mode and feature scale").

  PYTHONPATH=. python scripts/feature_scale.py [--out=runs/regime]

Reads OUT/features.npz (the embedded backbone's glyph_digits features, written by
`paper_regime.py c1 --mode=features` or by this script), writes OUT/features_x{K}.npz with every
feature multiplied by K so that the mean training row norm is TARGET_ROW_NORM (the 4,096-d CNN
features where the collapse was seen have row norms near 200), then for each variant (raw,
scaled, scaled + standardize, scaled + l2, raw + standardize) runs METHODS over the paper's
learning-rate grid (seed 0 for the choice, then 3 seeds at the chosen rate) and prints, per
method and variant: the chosen rate, validation and test mAP, and how much validation mAP moves
from epoch to epoch at that rate (mean |change| over epochs 6-25: a stable probe moves little).
"""
import argparse
import os

import numpy as np

from hml_jax.runtime import files
from hml_jax.tools import compare

METHODS = ('an', 'an_ls', 'wan', 'epr', 'role', 'em', 'hml')
GRID = (1e-2, 1e-3, 1e-4, 1e-5)  # the paper's grid (Sec. 4.1)
SEEDS, GRID_SEEDS = 3, 1
TARGET_ROW_NORM = 200.0


def scaled_file(path):
  arrays = dict(np.load(path))
  norm = float(np.linalg.norm(arrays['train_features'], axis=1).mean())
  factor = TARGET_ROW_NORM / norm
  output = os.path.splitext(path)[0] + f'_x{factor:.0f}.npz'
  if not os.path.exists(output):
    for key in [k for k in arrays if k.endswith('_features')]:
      arrays[key] = (arrays[key] * factor).astype(np.float32)
    np.savez(output, **arrays)
  return output, norm, factor


def oscillation(workdir):
  """Mean |epoch-to-epoch change| of validation mAP over epochs 6 .. last."""
  val = [
      epoch['val_map'] for epoch in files.read_json(files.join(workdir, 'results.json'))['epochs']
  ]
  return float(np.mean(np.abs(np.diff(val[5:])))) if len(val) > 6 else float('nan')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/regime')
  args = parser.parse_args()
  from hml_jax.runtime import host  # pylint: disable=g-import-not-at-top
  host.setup()
  from hml_jax.configs import features, glyph_digits  # pylint: disable=g-import-not-at-top
  raw = os.path.join(args.out, 'features.npz')
  if not os.path.exists(raw):
    from hml_jax.training import extract_features  # pylint: disable=g-import-not-at-top
    extract_features.extract_initial_to_file(
        glyph_digits.get_config(glyph_digits.CONTRAST_BACKBONE), raw)
  scaled, norm, factor = scaled_file(raw)
  print(f'Raw features: mean training row norm {norm:.2f}; scaled by {factor:.1f} to '
        f'{TARGET_ROW_NORM:.0f}.\n')
  variants = {
      'raw': (raw, 'none'),
      f'x{factor:.0f}': (scaled, 'none'),
      f'x{factor:.0f} + standardize': (scaled, 'standardize'),
      f'x{factor:.0f} + l2': (scaled, 'l2'),
      'raw + standardize': (raw, 'standardize')
  }
  print('| method | ' + ' | '.join(variants) + ' |')
  print('|---|' + '---|' * len(variants))
  cells = {method: [] for method in METHODS}
  for variant, (path, standardize) in variants.items():
    config = features.get_config()
    config.dataset.path = path
    config.dataset.standardize = standardize
    name = variant.replace(' + ', '_').replace(' ', '_')
    workdir = os.path.join(args.out, 'feature_scale', name)
    table, _ = compare.compare(config, workdir, METHODS, SEEDS, GRID, grid_seeds=GRID_SEEDS)
    for method, row in table.items():
      moves = [
          oscillation(
              os.path.join(workdir,
                           compare.run_name(method, row['learning_rate'], row['batch_size'], seed)))
          for seed in range(SEEDS)
      ]
      cells[method].append(f"{row['test_map_mean']:.2f} ± {row['test_map_std']:.2f} "
                           f"(val {row['val_map']:.2f}, lr {row['learning_rate']:g}, "
                           f"moves {np.mean(moves):.2f})")
  for method in METHODS:
    print(f'| {method} | ' + ' | '.join(cells[method]) + ' |')


if __name__ == '__main__':
  main()
