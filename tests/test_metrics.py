import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hml_jax.evaluation import metrics


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


@pytest.mark.parametrize('seed', range(3))
def test_threshold_metrics_match_sklearn(seed):
  from sklearn.metrics import precision_score, recall_score
  rng = np.random.RandomState(seed)
  labels = (rng.uniform(size=(300, 7)) < 0.3).astype(np.int32)
  labels[:, 6] = 0  # a class without positives: recall 0
  probabilities = rng.uniform(size=labels.shape)
  probabilities[:, 5] = 0.1  # a class never predicted: precision 0
  got = metrics.threshold_metrics(probabilities, labels, threshold=0.5)
  predicted = (probabilities >= 0.5).astype(np.int32)
  cp = precision_score(labels, predicted, average='macro', zero_division=0)
  cr = recall_score(labels, predicted, average='macro', zero_division=0)
  op = precision_score(labels, predicted, average='micro', zero_division=0)
  o_r = recall_score(labels, predicted, average='micro', zero_division=0)
  np.testing.assert_allclose([got['CP'], got['CR'], got['OP'], got['OR']], [cp, cr, op, o_r],
                             rtol=1e-12)
  np.testing.assert_allclose(got['CF1'], 2 * cp * cr / (cp + cr), rtol=1e-12)
  np.testing.assert_allclose(got['OF1'], 2 * op * o_r / (op + o_r), rtol=1e-12)


def test_top_k_metrics_by_hand():
  scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.2]])
  labels = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
  got = metrics.top_k_metrics(scores, labels, k=2)
  # Image 0: top-2 = {0, 1}, 1 hit of 2 positives; image 1: {3, 2}, 1 hit of 1; image 2: 0 hits.
  assert got['precision@2'] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
  assert got['recall@2'] == pytest.approx((1 / 2 + 1) / 2)  # image 2 has no positive
  with pytest.raises(ValueError, match='k=5'):
    metrics.top_k_metrics(scores, labels, k=5)
