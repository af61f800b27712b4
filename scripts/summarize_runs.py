"""Prints a markdown table (mean ± std over seeds) of the results.json files under a folder.

  python scripts/summarize_runs.py runs/table [MORE_FOLDERS...]

Runs (FOLDER/*/results.json) are grouped by label scenario (with its positive_fraction for the
partial scenarios), loss, learning rate and number of epochs.
"""
import collections
import glob
import json
import os
import sys

import numpy as np

from hml_jax import methods
from hml_jax.data import labels


def stat(runs, key):
  # A linear head has no s, m (older results.json files hold the unused config values).
  if any(r[key] is None or (
      key.startswith('final_') and not methods.get_method(r['config']['loss']).has_scale_and_margin)
         for r in runs):
    return '—'
  values = np.array([r[key] for r in runs], float)
  return f'{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0:.2f}'


def main(folders):
  groups = collections.defaultdict(list)
  paths = [
      path for folder in folders
      for path in sorted(glob.glob(os.path.join(folder, '*', 'results.json')))
  ]
  for path in paths:
    with open(path) as f:
      results = json.load(f)
    config = results['config']
    key = (labels.scenario_name(config['label_scenario'], config.get('positive_fraction')),
           config['loss'], config['learning_rate'], config['num_epochs'])
    groups[key].append(results)
  print('| labels | method | lr | epochs | seeds | val mAP (best epoch) | '
        'test mAP (best val epoch) | test mAP (last epoch) | best epochs | final s* | final m* | '
        'train img/s | wall s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for (scenario, loss, learning_rate, epochs), runs in sorted(groups.items()):
    best_epochs = ','.join(str(r['best_epoch']) for r in runs)
    print(f'| {scenario} | {loss} | {learning_rate:g} | {epochs} | {len(runs)} | '
          f'{stat(runs, "val_map")} | {stat(runs, "test_map")} | {stat(runs, "last_test_map")} | '
          f'{best_epochs} | {stat(runs, "final_scale")} | {stat(runs, "final_margin")} | '
          f'{np.mean([r["train_images_per_sec"] for r in runs]):.0f} | '
          f'{np.mean([r["wall_seconds"] for r in runs]):.0f} |')


if __name__ == '__main__':
  main(sys.argv[1:] or ['runs/table'])
