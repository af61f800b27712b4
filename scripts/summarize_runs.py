"""Prints a markdown table (mean +- std over seeds) of the results.json files under a folder.

  python scripts/summarize_runs.py runs/table
"""
import collections
import glob
import json
import os
import sys

import numpy as np

from hml_jax import losses


def main(folder):
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(folder, '*', 'results.json'))):
    with open(path) as f:
      results = json.load(f)
    config = results['config']
    groups[(config['label_scenario'], config['loss'])].append(results)

  def stat(runs, key):
    # A linear head has no s, m (older results.json files hold the unused config values).
    if any(r[key] is None or (key.startswith('final_') and
                              losses.get_method(r['config']['loss']).head != 'cosine')
           for r in runs):
      return '—'
    values = np.array([r[key] for r in runs], float)
    return f'{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0:.2f}'

  print('| labels | method | seeds | test mAP (best val epoch) | test mAP (last epoch) | '
        'best epoch | final s* | final m* | train img/s | wall s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for (scenario, loss), runs in sorted(groups.items()):
    epochs = ','.join(str(r['best_epoch']) for r in runs)
    print(f'| {scenario} | {loss} | {len(runs)} | {stat(runs, "test_map")} | '
          f'{stat(runs, "last_test_map")} | {epochs} | {stat(runs, "final_scale")} | '
          f'{stat(runs, "final_margin")} | {np.mean([r["train_images_per_sec"] for r in runs]):.0f} | '
          f'{np.mean([r["wall_seconds"] for r in runs]):.0f} |')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'runs/table')
