"""scripts/scale_margin.py's protocol (which cells, which seeds, chosen how) and its heatmap, on
made-up runs."""
import json
import os

import matplotlib.image
import pytest

from scripts import scale_margin


def test_the_grids_are_the_papers():
  features = scale_margin.grid_cells('features')
  assert len(features) == 36 and len(set(features)) == 36
  assert {s for s, _ in features} == {5, 10, 20, 30, 40, 64}
  assert {m for _, m in features} == {0, 0.1, 0.2, 0.3, 0.4, 0.5}
  finetune = scale_margin.grid_cells('finetune')
  # m = 0 at every scale, s = 20 and 40 at every margin: 6 + 6 + 6 - 2 shared cells.
  assert len(finetune) == 16
  assert all(m == 0 or s in (20, 40) for s, m in finetune)
  assert {(s, 0.0) for s in scale_margin.SCALES} <= set(finetune)


def _fake_runs(calls, val_of):

  def runs(config, workdir, method, rate, seeds, **overrides):
    calls.append((method, rate, seeds, overrides.get('scale'), overrides.get('margin')))
    value = val_of(overrides.get('scale'), overrides.get('margin'))
    return {
        'seeds': seeds,
        'val_map_mean': value,
        'val_map_std': 0.0,
        'test_map_mean': value + 1,
        'test_map_std': 0.1 if seeds > 1 else 0.0,
        'results': [{
            'final_scale': 9.0,
            'final_margin': 0.7,
            'epochs': []
        }] * seeds
    }

  return runs


def test_fine_tuning_adds_seeds_at_the_best_cell_by_validation_and_at_the_papers(monkeypatch):
  calls = []
  # Validation peaks at (40, 0.1); test mAP is never looked at for the choice.
  monkeypatch.setattr(scale_margin, 'runs',
                      _fake_runs(calls, lambda s, m: -abs(s - 40) - 10 * abs(m - 0.1)))
  rows = scale_margin.fig5_rows(None, '/out', 'finetune', 'glyph')
  assert all(rate == 1e-3 and method == 'hml_fixed' for method, rate, *_ in calls)
  assert [c for c in calls if c[2] == 1] and len([c for c in calls if c[2] == 1]) == 16
  assert sorted((s, m) for _, _, seeds, s, m in calls if seeds == 3) == [(20.0, 0.3), (40.0, 0.1)]
  assert rows[(40.0, 0.1)]['seeds'] == 3 and rows[(5.0, 0.0)]['seeds'] == 1


def test_features_mode_runs_every_cell_with_three_seeds(monkeypatch):
  calls = []
  monkeypatch.setattr(scale_margin, 'runs', _fake_runs(calls, lambda s, m: s + m))
  scale_margin.fig5_rows(None, '/out', 'features', 'glyph')
  assert len(calls) == 36 and all(seeds == 3 and rate == 1e-2 for _, rate, seeds, _, _ in calls)
  calls.clear()
  scale_margin.fig5_rows(None, '/out', 'features', 'composite')  # the second data set: seed 0
  assert len(calls) == 36 and all(seeds == 1 for _, _, seeds, _, _ in calls)


@pytest.mark.parametrize('reading,start,seeds', [('default', (5.0, 0.0), 3),
                                                 ('default', (10.0, 0.1), 1),
                                                 ('paper', (40.0, 0.5), 1)])
def test_fine_tuning_seeds_of_the_adaptive_starts(reading, start, seeds):
  assert scale_margin.start_seeds('finetune', reading, start) == seeds
  assert scale_margin.start_seeds('features', reading, start) == 3


def test_heatmap_from_fig5_json(tmp_path, monkeypatch):
  out = tmp_path / 'runs'
  cells = {
      f'{s:g},{m:g}': {
          'test_map_mean': 50 + s / 10 - m,
          'test_map_std': 0.1,
          'val_map_mean': 50,
          'seeds': 3
      } for s in scale_margin.SCALES for m in scale_margin.MARGINS
  }
  os.makedirs(out / 'features' / 'fig5_glyph')
  (out / 'features' / 'fig5_glyph' / 'fig5.json').write_text(json.dumps(cells))
  os.makedirs(out / 'finetune' / 'fig5_glyph')
  finetune = {k: v for k, v in cells.items() if k.endswith(',0') or k.startswith(('20,', '40,'))}
  (out / 'finetune' / 'fig5_glyph' / 'fig5.json').write_text(json.dumps(finetune))
  target = tmp_path / 'fig5.png'
  monkeypatch.setattr(scale_margin, 'HEATMAP', str(target))
  scale_margin.heatmap(str(out))
  image = matplotlib.image.imread(target)
  assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
  with pytest.raises(SystemExit, match='No fig5.json'):
    scale_margin.heatmap(str(tmp_path / 'empty'))
