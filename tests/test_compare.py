import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hml_jax.tools import compare

from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_compare_trains_each_method_and_reuses_finished_runs(tfds_dir, tmp_path):
  """Real training through compare: a cosine-head and a linear-head method (every method's step
  is tested in test_train.py, the pseudo-label methods' epochs in test_method_state_survives_
  resuming; compare itself does not depend on the method)."""
  config = tiny_config(tfds_dir, num_epochs=1)
  methods = ['an', 'hml']
  table, markdown = compare.compare(config, str(tmp_path), methods, seeds=1)
  assert list(table) == methods
  for method in methods:
    assert f'| {method} |' in markdown
    assert 0 < table[method]['test_map_mean'] <= 100
  with open(tmp_path / 'table.json') as f:
    saved = json.load(f)
  assert len(saved['runs']) == len(methods)
  assert (tmp_path / 'table.md').read_text() == markdown
  # A second call reuses every run (nothing is retrained: results.json files are untouched).
  results = [tmp_path / run['run'] / 'results.json' for run in saved['runs']]
  before = [os.path.getmtime(path) for path in results]
  compare.compare(config, str(tmp_path), methods, seeds=1)
  assert [os.path.getmtime(path) for path in results] == before


def fake_training(monkeypatch):
  """Replaces training by a function of the run's learning rate and seed, so that the choice of
  a sweep point can be checked exactly: validation mAP peaks at lr 1e-3, test mAP is 10 points
  under it, and the seed adds 0.1 per seed. Returns the list of trained (lr, seed)."""
  trained = []

  def train_and_evaluate(config, workdir):
    trained.append((config.learning_rate, config.seed))
    val_map = 60.0 - 10 * abs(np.log10(config.learning_rate) + 3) + 0.1 * config.seed
    results = {
        'val_map': val_map,
        'test_map': val_map - 10,
        'last_test_map': val_map - 11,
        'best_epoch': 1,
        'epochs': [{}] * config.num_epochs
    }
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    return results

  monkeypatch.setattr(compare.train, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(compare.workdir_files, 'check_config', lambda workdir, config: None)
  return trained


def test_sweep_picks_the_best_validation_point(tmp_path, monkeypatch):
  trained = fake_training(monkeypatch)
  config = tiny_config('unused', num_epochs=1)
  table, _ = compare.compare(config,
                             str(tmp_path), ['an'],
                             seeds=2,
                             learning_rates=['1e-2', '1e-3', '1e-4'])
  assert sorted(trained) == [(lr, seed) for lr in (1e-4, 1e-3, 1e-2) for seed in (0, 1)]
  assert table['an']['learning_rate'] == 1e-3 and table['an']['seeds'] == 2
  assert table['an']['test_map_mean'] == pytest.approx(50.05)
  compare.compare(config, str(tmp_path), ['an'], seeds=2, learning_rates=['1e-2', '1e-3', '1e-4'])
  assert len(trained) == 6  # every run reused


@pytest.mark.slow
def test_compare_cli_rejects_an_unknown_method(tfds_dir, tmp_path):
  result = subprocess.run([
      sys.executable, '-m', 'hml_jax.compare', '--config=configs/tiny.py', f'--workdir={tmp_path}',
      '--methods=an,hmll', '--seeds=1', f'--config.dataset.data_dir={tfds_dir}'
  ],
                          cwd=ROOT,
                          capture_output=True,
                          text=True)
  assert result.returncode != 0 and "Unknown loss 'hmll'" in result.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_compare_refuses_to_reuse_a_run_made_with_another_config(tfds_dir, tmp_path):
  compare.compare(tiny_config(tfds_dir, num_epochs=1), str(tmp_path), ['an'], seeds=1)
  changed = tiny_config(tfds_dir, num_epochs=1, label_scenario='full')
  with pytest.raises(ValueError, match="label_scenario: 'single_positive' in the workdir"):
    compare.compare(changed, str(tmp_path), ['an'], seeds=1)


def test_compare_table_names_the_scenario_and_its_fraction():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      'dataset': {
          'name': 'hml_voc2012'
      },
      'label_scenario': 'partial_positive',
      'positive_fraction': 0.3
  })
  runs = [{
      'method': 'an',
      'learning_rate': 1e-3,
      'batch_size': 16,
      'val_map': 80.0,
      'test_map': 79.0 + seed,
      'last_test_map': 78.0
  } for seed in range(2)]
  table, markdown = compare.summarize(runs, config)
  assert markdown.splitlines()[0].startswith('| method | hml_voc2012 (partial_positive 0.3) |')
  assert table['an']['test_map_mean'] == 79.5 and table['an']['seeds'] == 2


def test_the_table_has_best_epochs_learned_scale_and_margin_and_speed():
  """The columns of the embedded results table: best epochs, s* and m* (mean ± sample std;
  '—' for a method without them), train images/s and wall seconds (means)."""
  runs = [{
      'method': method,
      'learning_rate': 1e-3,
      'batch_size': 32,
      'seed': seed,
      'val_map': 70.0 + seed,
      'test_map': 60.0 + 2 * seed,
      'last_test_map': 59.0,
      'best_epoch': 9 + seed,
      'final_scale': 6.0 + seed if method == 'hml' else None,
      'final_margin': 0.25 if method == 'hml' else None,
      'train_images_per_sec': 600.0 + 10 * seed,
      'wall_seconds': 160.0 - seed,
  } for method in ('an', 'hml') for seed in (0, 1)]
  table, markdown = compare.summarize(runs, tiny_config('unused'))
  assert table['hml']['final_scale'] == (6.5, np.std([6.0, 7.0], ddof=1))
  assert table['an']['final_scale'] is None and table['an']['best_epochs'] == [9, 10]
  rows = {line.split(' | ')[0][2:]: line for line in markdown.splitlines()[2:]}
  assert rows['hml'].endswith('| 61.00 ± 1.41 | 0.001 | 32 | 2 | 70.50 | 59.00 | 9, 10 | '
                              '6.50 ± 0.71 | 0.25 ± 0.00 | 605 | 160 |'[len('| 61.00 ± 1.41 '):])
  assert '| 9, 10 | — | — | 605 | 160 |' in rows['an']


def test_grid_seeds_choose_on_the_first_seeds_then_complete_the_chosen_point(tmp_path, monkeypatch):
  trained = fake_training(monkeypatch)
  table, _ = compare.compare(tiny_config('unused', num_epochs=1),
                             str(tmp_path), ['an'],
                             seeds=3,
                             learning_rates=['1e-2', '1e-3', '1e-4'],
                             grid_seeds=1)
  # The grid on seed 0, then seeds 1 and 2 at the chosen point only.
  assert trained == [(1e-2, 0), (1e-3, 0), (1e-4, 0), (1e-3, 1), (1e-3, 2)]
  with open(tmp_path / 'table.json') as f:
    saved = json.load(f)
  assert saved['grid_seeds'] == 1 and len(saved['runs']) == 5
  assert table['an']['learning_rate'] == 1e-3 and table['an']['seeds'] == 3
  assert table['an']['test_map_mean'] == pytest.approx(50.1)
