"""When HML helps: the strong source backbone's criterion and HML - AN under one change at a time,
the runs and tables of docs/results.md, section "When HML helps".

  PYTHONPATH=. python scripts/when_hml_helps.py criterion [--backbone=embedded:NAME]
      [--out=$PWD/runs/regime]
  PYTHONPATH=. python scripts/when_hml_helps.py conditions|fig2|per_epoch [--only=base,...]
      [--out=$PWD/runs/regime]

criterion: on glyph_digits, the linear probe (features mode, BCE, full labels, lr by validation)
against full-label fine-tuning (BCE, lr 1e-3) from a candidate backbone (the first,
embedded:glyph_source_resnet_small, by default), 3 seeds each. conditions: HML and AN fine-tuned on glyph_digits with single positive labels, 3 seeds,
under the base setup (the C1 table's, HML under the paper's reading of s*, m*) and each change of
CONDITIONS on its own. fig2: the false negatives' share of the gradient (paper Fig. 2) at seed
0's best checkpoint under each finished condition; per_epoch: the same quantity and the false
negatives' mean probability after every epoch (seed 0 of HML and AN, PER_EPOCH_CONDITIONS). Finished runs are reused (hml_jax.compare), so
a table is printed again without training; AN's runs and those of condition f are the C1 rerun's
(paper_regime.py c1 --methods=hml,an: the same configs).
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

SEEDS = 3
STRONG = 'embedded:glyph_source_resnet_small'
# HML as the C1 table measured it: s*, m* by Eq. 6 on their own Adam at 1e-3 (docs/methods.md).
PAPER_READING = {
    'adaptive_scale': 'balance',
    'adaptive_optimizer': 'separate',
    'adaptive_learning_rate': 1e-3
}
# Each change on its own, over the base (configs/glyph_digits.py, lr 1e-3, batch 32, 10 epochs,
# shift augmentation of 4 px, the shipped backbone). 'hml' keys apply to HML only.
CONDITIONS = {
    'base': {},
    'a_strong_backbone': {
        'init_from': STRONG
    },
    'f_default_reading': {
        'hml': {}
    },
    'e_no_shift': {
        'augment_max_shift': 0
    },
    'd1_lr_1e-4_head_x10': {
        'learning_rate': 1e-4,
        'head_learning_rate_multiplier': 10.0
    },
    # ROLE's published head phase (hml_jax/methods/recipes.py, Cole et al.).
    'd2_linear_init': {
        'linear_init_epochs': 25,
        'linear_init_learning_rate': 1e-3,
        'linear_init_batch_size': 16
    },
    'b_batch_8': {
        'batch_size': 8
    },
    'c_30_epochs': {
        'num_epochs': 30
    },
    # Not a single change: (a) and (f) together, the regime a user gets from both defaults.
    'a_and_f_strong_default_reading': {
        'init_from': STRONG,
        'hml': {}
    },
}
METHODS = {'a_strong_backbone': ('hml', 'an', 'wan')}


def condition_config(name, method):
  from hml_jax.configs import glyph_digits  # pylint: disable=g-import-not-at-top
  config = glyph_digits.get_config(glyph_digits.CONTRAST_BACKBONE)
  overrides = dict(CONDITIONS[name])
  hml_overrides = overrides.pop('hml', PAPER_READING)
  if method == 'hml':
    overrides = {**overrides, **hml_overrides}
  for key, value in overrides.items():
    config[key] = value
  return config


def test_maps(config, workdir, method, seeds=SEEDS):
  """The seeds' test mAPs of one method at config's rate (finished runs reused)."""
  return np.array([r['test_map'] for r in compare.seed_results(config, workdir, method, seeds)])


def condition_workdir(out, name, method):
  if (name, method) in (('base', 'an'), ('f_default_reading', 'an'), ('f_default_reading', 'hml')):
    # The C1 rerun under today's default (paper_regime.py c1): the very configs.
    return os.path.join(out, 'finetune', 'c1')
  if (name, method) == ('a_and_f_strong_default_reading', 'an'):
    name = 'a_strong_backbone'  # AN reads no adaptive key: the same runs
  return os.path.join(out, 'finetune', 'when', name)


def mean_std(values):
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def difference(a, b):
  """Mean difference of two seed sets and the std of that difference of means."""
  spread = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  return f'{a.mean() - b.mean():+.2f} ± {spread:.2f}'


def conditions(out, only):
  names = [n for n in CONDITIONS if not only or n in only]
  rows = []
  for name in names:
    values = {}
    for method in METHODS.get(name, ('hml', 'an')):
      config = condition_config(name, method)
      values[method] = test_maps(config, condition_workdir(out, name, method), method)
    rows.append((name, values))
  print('HML - AN on glyph_digits, fine-tuning, single positive labels, 3 seeds (test mAP at the '
        'best validation epoch; ± of the difference: std of the difference of the means)\n')
  print('| condition | HML | AN | HML − AN | beside |')
  print('|---|---|---|---|---|')
  for name, values in rows:
    beside = (f"WAN {mean_std(values['wan'])}, HML − WAN {difference(values['hml'], values['wan'])}"
              if 'wan' in values else '')
    print(f"| {name} | {mean_std(values['hml'])} | {mean_std(values['an'])} | "
          f"{difference(values['hml'], values['an'])} | {beside} |")


def false_negative_share(workdir):
  """The paper's Fig. 2 quantity at the best checkpoint (hml_jax.analyze, training images): the
  false negatives' share of the negative-side gradient |dL/d output| (false + true negatives)
  and their mean output (logit for AN, cosine for HML)."""
  from hml_jax.tools import analyze  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'analysis', 'analysis.json')
  report = files.read_json(path) if os.path.exists(path) else analyze.analyze(workdir)
  groups = report['densities']['groups']
  mass = {g: groups[g]['count'] * groups[g]['mean_gradient'] for g in groups}
  share = mass['false negatives'] / (mass['false negatives'] + mass['true negatives'])
  return share, groups['false negatives']['mean_output']


def fig2(out, only):
  """Seed 0 of HML and AN under each finished condition: the false negatives' gradient share."""
  print('| condition | method | false negatives: share of the negative-side gradient | '
        'their mean output |')
  print('|---|---|---|---|')
  for name in [n for n in CONDITIONS if not only or n in only]:
    for method in METHODS.get(name, ('hml', 'an')):
      config = condition_config(name, method)
      workdir = files.join(condition_workdir(out, name, method),
                           compare.run_name(method, config.learning_rate, config.batch_size, 0))
      if not os.path.exists(os.path.join(workdir, 'results.json')):
        continue
      share, output = false_negative_share(workdir)
      print(f'| {name} | {method} | {100 * share:.1f}% | {output:.3f} |')


# Per epoch (paper Fig. 2 over training): seed 0 of AN and HML in these conditions, measured on
# the first PER_EPOCH_IMAGES training images after every epoch (config.false_negative_images).
PER_EPOCH_CONDITIONS = ('base', 'f_default_reading', 'a_strong_backbone',
                        'a_and_f_strong_default_reading')
PER_EPOCH_IMAGES = 2000


def per_epoch(out, only):
  """The false negatives' mean probability and gradient share after each epoch (a run of its own
  per condition and method: the measurement does not change the training, so each is the seed-0
  run of the conditions table, bitwise)."""
  print('| condition | method | epoch: false negatives\' mean probability / share of the '
        'negative-side gradient |')
  print('|---|---|---|')
  for name in [n for n in PER_EPOCH_CONDITIONS if not only or n in only]:
    for method in ('hml', 'an'):
      if method == 'an' and 'hml' in CONDITIONS[name]:
        continue  # AN reads no adaptive key: the condition without (f) has its run
      config = condition_config(name, method)
      config.false_negative_images = PER_EPOCH_IMAGES
      results = compare.seed_results(config, os.path.join(out, 'finetune', 'when_per_epoch', name),
                                     method, 1)[0]
      cells = ', '.join(f"{e['epoch']}: {e['false_negative_probability']:.3f} / "
                        f"{100 * e['false_negative_gradient_share']:.1f}%"
                        for e in results['epochs'])
      print(f'| {name} | {method} | {cells} |')


def criterion(out, backbone=STRONG):
  """The probe and fine-tuning runs of the criterion from backbone; the first candidate's under
  'strong_*' names, another's under its own name."""
  from hml_jax.configs import features, glyph_digits  # pylint: disable=g-import-not-at-top
  prefix = 'strong' if backbone == STRONG else backbone.split(':')[-1]
  source = glyph_digits.get_config(glyph_digits.CONTRAST_BACKBONE)
  glyph_digits.with_backbone(source, backbone)
  path = os.path.join(out, f'{prefix}_features.npz')
  if not os.path.exists(path):
    files.makedirs(out)
    extract_features.extract_initial_to_file(source, path)
  probe = features.get_config()
  probe.dataset.path = path
  probe.label_scenario = 'full'
  probe_dir = os.path.join(out, 'features', f'{prefix}_criterion')
  compare.compare(probe, probe_dir, ['bce'], SEEDS, (1e-2, 1e-3, 1e-4))
  table = files.read_json(os.path.join(probe_dir, 'table.json'))
  print(f'Linear probe (features mode, BCE, full labels): {table}')
  fine = glyph_digits.get_config(glyph_digits.CONTRAST_BACKBONE)
  glyph_digits.with_backbone(fine, backbone).label_scenario = 'full'
  tuned = test_maps(fine, os.path.join(out, 'finetune', f'{prefix}_criterion'), 'bce')
  print(f'Fine-tuning (BCE, full labels, lr 1e-3): {mean_std(tuned)}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('table', choices=['criterion', 'conditions', 'fig2', 'per_epoch'])
  parser.add_argument('--only', default='', help='comma-separated condition names')
  parser.add_argument('--backbone', default=STRONG, help='criterion only: the candidate backbone')
  parser.add_argument('--out', default=os.path.abspath('runs/regime'))
  args = parser.parse_args()
  from hml_jax.runtime import host  # pylint: disable=g-import-not-at-top
  host.setup()
  out = os.path.abspath(args.out)
  if args.table == 'criterion':
    criterion(out, args.backbone)
    return
  only = [n for n in args.only.split(',') if n]
  unknown = sorted(set(only) - set(CONDITIONS))
  if unknown:
    sys.exit(f'Unknown condition(s) {unknown}; choose from {list(CONDITIONS)}.')
  {'conditions': conditions, 'fig2': fig2, 'per_epoch': per_epoch}[args.table](out, only)


if __name__ == '__main__':
  main()
