"""s* and m* under their own Adam ('separate') or the network's ('shared'): the runs and the table
of docs/results.md, section "How s* and m* are optimized".

  PYTHONPATH=. python scripts/compare_adaptive_optimizer.py [OUT_DIR] [--features-only]

Design (written before the runs): adaptive HML, single positive labels, seeds 0, 1, 2.
  1. Fine-tuning on the embedded default dataset (configs/default.py, from scratch, 10 epochs),
     learning rates 1e-2 and 1e-4. At the default 1e-3 the two options are the same optimizer
     (config.adaptive_learning_rate is 1e-3 too; tests/test_losses.py checks it), so no run there.
  2. Features mode (configs/features.py, 25 epochs): the features of the backbone of one
     full-label AN run of the default config (seed 0; a stand-in for ImageNet features, see the
     docs), learning rates 1e-2, 1e-3, 1e-4, 1e-5.
Each cell: test mAP at the best validation epoch, mean ± sample std over seeds, with the final
s*, m*. Per option, the learning rate is chosen by mean validation mAP. Finished runs (their
results.json exists) are reused.
"""
import json
import os
import subprocess
import sys

import numpy as np

SEEDS = (0, 1, 2)
OPTIONS = ('separate', 'shared')
FINE_TUNING_RATES = (1e-2, 1e-4)
FEATURES_RATES = (1e-2, 1e-3, 1e-4, 1e-5)

# The readings this table compares: s*, m* both by Eq. 6 on a plain Adam at 1e-3 ('separate') or
# on the network's ('shared'), whatever configs/default.py's reading is.
PAPER_READING = ('--config.adaptive_scale=balance', '--config.adaptive_learning_rate=0.001')


def train(workdir, config, *flags):
  if any(flag.startswith('--config.adaptive_optimizer=') for flag in flags):
    flags += PAPER_READING
  if os.path.exists(os.path.join(workdir, 'results.json')):
    return
  print(f'== {workdir}', flush=True)
  subprocess.run(
      [sys.executable, '-m', 'hml_jax.main', f'--config={config}', f'--workdir={workdir}', *flags],
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)


def run_all(out, features_only):
  rows = {}

  def fine_tune(rates):
    for rate in rates:
      for option in OPTIONS:
        rows[('fine-tuning', rate, option)] = [
            os.path.join(out, f'finetune_lr{rate:g}_{option}_seed{seed}') for seed in SEEDS
        ]
        for workdir, seed in zip(rows[('fine-tuning', rate, option)], SEEDS):
          train(workdir, 'configs/default.py', '--config.loss=hml', f'--config.seed={seed}',
                f'--config.learning_rate={rate}', f'--config.adaptive_optimizer={option}')

  if not features_only:
    fine_tune(FINE_TUNING_RATES[:1])
  extractor = os.path.join(out, 'an_full_seed0')
  train(extractor, 'configs/default.py', '--config.loss=an', '--config.label_scenario=full',
        '--config.seed=0')
  features = os.path.join(out, 'an_full_seed0_features.npz')
  if not os.path.exists(features):
    subprocess.run([
        sys.executable, '-m', 'hml_jax.extract_features', f'--workdir={extractor}',
        f'--output={features}'
    ],
                   check=True,
                   stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
  for rate in FEATURES_RATES:
    for option in OPTIONS:
      rows[('features', rate, option)] = [
          os.path.join(out, f'features_lr{rate:g}_{option}_seed{seed}') for seed in SEEDS
      ]
      for workdir, seed in zip(rows[('features', rate, option)], SEEDS):
        train(workdir, 'configs/features.py', f'--config.dataset.path={features}',
              '--config.loss=hml', f'--config.seed={seed}', f'--config.learning_rate={rate}',
              f'--config.adaptive_optimizer={option}')
  if not features_only:
    fine_tune(FINE_TUNING_RATES[1:])  # the slowest arm last
  return rows


def mean_std(values):
  values = np.asarray(values, float)
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def summarize(rows):
  print('| mode | learning rate | s\\*, m\\* optimizer | test mAP | val mAP | final s\\* | '
        'final m\\* |')
  print('|---|---|---|---|---|---|---|')
  chosen = {}
  for (mode, rate, option), workdirs in rows.items():
    results = []
    for workdir in workdirs:
      with open(os.path.join(workdir, 'results.json')) as f:
        results.append(json.load(f))
    val = np.mean([r['val_map'] for r in results])
    print(f'| {mode} | {rate:g} | {option} | {mean_std([r["test_map"] for r in results])} | '
          f'{mean_std([r["val_map"] for r in results])} | '
          f'{mean_std([r["final_scale"] for r in results])} | '
          f'{mean_std([r["final_margin"] for r in results])} |')
    best = chosen.get((mode, option))
    if best is None or val > best[0]:
      chosen[(mode, option)] = (val, rate, mean_std([r['test_map'] for r in results]))
  print()
  for (mode, option), (val, rate, test) in sorted(chosen.items()):
    print(f'{mode}, {option}: learning rate {rate:g} chosen by validation ({val:.2f}), '
          f'test mAP {test}')


def main(argv):
  out = argv[1] if len(argv) > 1 and not argv[1].startswith('--') else 'runs/adaptive_optimizer'
  os.makedirs(out, exist_ok=True)
  summarize(run_all(out, '--features-only' in argv))


if __name__ == '__main__':
  main(sys.argv)
