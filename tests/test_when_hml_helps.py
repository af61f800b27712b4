"""scripts/when_hml_helps.py's protocol: one change per condition, HML under the paper's reading
except where the condition is the reading, the spread of a difference, and the false negatives'
gradient share, on made-up runs."""
import json
import os

import numpy as np

from scripts import when_hml_helps


def test_each_condition_changes_one_thing_over_the_base():
  base = {
      method: when_hml_helps.condition_config('base', method).to_dict() for method in ('hml', 'an')
  }
  assert base['hml']['adaptive_scale'] == 'balance'  # the C1 table's reading
  assert base['hml']['adaptive_optimizer'] == 'separate'
  assert base['an']['adaptive_scale'] == 'spread'  # untouched: AN reads no adaptive key
  for name, overrides in when_hml_helps.CONDITIONS.items():
    for method in when_hml_helps.METHODS.get(name, ('hml', 'an')):
      config = when_hml_helps.condition_config(name, method).to_dict()
      reference = base['hml' if method == 'hml' else 'an']
      changed = {k for k in config if config[k] != reference[k]}
      expected = set(overrides) - {'hml'}
      if 'hml' in overrides and method == 'hml':  # the default reading instead of the paper's
        expected |= {'adaptive_scale', 'adaptive_optimizer', 'adaptive_learning_rate'}
      assert changed == expected, (name, method, changed)


def test_difference_spread_is_the_std_of_the_difference_of_means():
  a, b = np.array([76.0, 77.0, 78.0]), np.array([72.0, 73.0, 77.0])
  spread = np.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3)
  assert when_hml_helps.difference(a, b) == f'{a.mean() - b.mean():+.2f} ± {spread:.2f}'


def test_false_negative_share_reads_the_analysis(tmp_path):
  os.makedirs(tmp_path / 'analysis')
  groups = {
      'positives': {
          'count': 10,
          'mean_gradient': 0.5,
          'mean_output': 2.0
      },
      'true negatives': {
          'count': 300,
          'mean_gradient': 0.01,
          'mean_output': -6.0
      },
      'false negatives': {
          'count': 20,
          'mean_gradient': 0.15,
          'mean_output': -2.5
      },
  }
  (tmp_path / 'analysis' / 'analysis.json').write_text(json.dumps({'densities': {
      'groups': groups
  }}))
  share, output = when_hml_helps.false_negative_share(str(tmp_path))
  assert np.isclose(share, 3.0 / (3.0 + 3.0)) and output == -2.5
