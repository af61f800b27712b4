import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hml_jax import metrics


@pytest.mark.parametrize('seed', range(5))
def test_average_precision_equals_sklearn_with_ties(seed):
  rng = np.random.RandomState(seed)
  labels = (rng.uniform(size=(200, 9)) < 0.25).astype(np.int32)
  labels[0] = 1  # every class has a positive
  # Few distinct values so that ties are everywhere, including across labels.
  scores = rng.randint(0, 6, size=labels.shape).astype(np.float32) / 5
  scores[:, 0] = rng.normal(size=200)  # one column without ties
  scores[:, 1] = 0.5  # one column entirely tied
  got = metrics.average_precision_per_class(scores, labels)
  expected = [average_precision_score(labels[:, j], scores[:, j]) for j in range(9)]
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  np.testing.assert_allclose(metrics.mean_average_precision(scores, labels), np.mean(expected))


def test_class_without_positives_is_left_out_of_the_mean():
  labels = np.array([[1, 0], [0, 0], [1, 0]])
  scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.5]])
  ap = metrics.average_precision_per_class(scores, labels)
  assert ap[0] == 1.0 and np.isnan(ap[1])
  assert metrics.mean_average_precision(scores, labels) == 1.0


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='0/1'):
    metrics.mean_average_precision(np.zeros((2, 2)), np.array([[2, 0], [0, 1]]))
  with pytest.raises(ValueError, match='shape|num_examples'):
    metrics.mean_average_precision(np.zeros((2, 3)), np.zeros((2, 2)))
  with pytest.raises(ValueError, match='no class has a positive'):
    metrics.mean_average_precision(np.zeros((2, 2)), np.zeros((2, 2)))
