"""scripts/paper_regime.py's rule for more seeds, on tables of made-up numbers."""
from scripts import paper_regime


def row(mean, std):
  return {'test_map_mean': mean, 'test_map_std': std, 'seeds': 3}


def test_methods_within_two_stds_of_hml_get_more_seeds_and_hml_with_them():
  table = {
      'an': row(73.22, 1.60),  # 0.43 from HML, under 2 x 1.60
      'em': row(76.44, 0.24),  # 3.65 from HML, over 2 x 0.37
      'hml': row(72.79, 0.37),
      'an_ls': row(72.29, 0.91),  # 0.50, under 2 x 0.91
  }
  assert paper_regime.near_hml(table) == ['hml', 'an', 'an_ls']


def test_the_larger_std_of_the_two_decides_and_nothing_near_means_no_more_seeds():
  assert paper_regime.near_hml({'hml': row(57.0, 0.5), 'wan': row(57.9, 0.1)}) == ['hml', 'wan']
  assert paper_regime.near_hml({'hml': row(57.0, 0.5), 'wan': row(58.1, 0.1)}) == []
