"""Label correlation (paper Eq. 8) of a trained HML run against the planted partner pairs.

  python scripts/label_correlation.py runs/table/hml_full_seed0 [more workdirs...]

Prints Corr(i, j) with the run's learned s*, m* and, for each label, whether its most
correlated other label is its planted partner in the embedded composite-digits dataset.
"""
import sys

import numpy as np

from hml_jax import analysis, train
from hml_jax.datasets import composite_digits


def main(workdirs):
  for workdir in workdirs:
    config, method, state = train.load_trained_state(workdir)
    scale, margin = train.scale_and_margin(state.params, config, method)
    embeddings = np.asarray(state.params['model']['head']['label_embeddings']).T
    correlation = np.asarray(analysis.label_correlation(embeddings, scale, margin))
    np.set_printoptions(precision=2, suppress=True, linewidth=120)
    print(f'{workdir}: s={float(scale):.2f} m={float(margin):.3f}')
    print(correlation)
    partner = dict(composite_digits.PARTNER_PAIRS + tuple(
        (b, a) for a, b in composite_digits.PARTNER_PAIRS))
    off_diagonal = np.where(np.eye(len(correlation), dtype=bool), -np.inf, correlation)
    nearest = off_diagonal.argmax(1)
    hits = sum(int(nearest[i] == partner[i]) for i in range(len(nearest)))
    print(f'most correlated label is the planted partner for {hits}/{len(nearest)} labels: '
          f'{dict(enumerate(nearest.tolist()))}')


if __name__ == '__main__':
  main(sys.argv[1:])
