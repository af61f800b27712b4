import numpy as np
import pytest

from hml_jax.data import labels as labels_lib


def cole_et_al_single_positive(label_matrix, seed):
  """Transcription of Cole et al.'s observe_uniform (num_pos=1, num_neg=0) on -1/+1 labels."""
  signed = np.where(label_matrix == 1, 1.0, -1.0)
  rng = np.random.RandomState(seed)
  observed = np.zeros_like(signed)
  for i in range(signed.shape[0]):
    idx_pos = np.nonzero(signed[i, :] == 1.0)[0]
    rng.shuffle(idx_pos)
    observed[i, idx_pos[:1]] = 1.0
    idx_neg = np.nonzero(signed[i, :] == -1.0)[0]
    rng.shuffle(idx_neg)
    observed[i, idx_neg[:0]] = -1.0
  return (observed == 1).astype(label_matrix.dtype)


def random_labels(seed=0, shape=(300, 12)):
  labels = (np.random.RandomState(seed).uniform(size=shape) < 0.3).astype(np.int32)
  labels[5] = 1  # an image with no negatives
  labels[6] = 0  # an image with no positives
  return labels


def test_single_positive_matches_the_published_procedure():
  labels = random_labels()
  observed = labels_lib.observe(labels, 'single_positive', seed=1200)
  np.testing.assert_array_equal(observed, cole_et_al_single_positive(labels, 1200))
  has_positive = labels.sum(1) > 0
  assert np.all(observed.sum(1) == has_positive)
  assert np.all(observed <= labels)


def test_partial_keeps_a_fraction_and_at_least_one():
  labels = random_labels(1)
  observed = labels_lib.observe(labels, 'partial', seed=0, fraction=0.5)
  counts = labels.sum(1)
  expected = np.where(counts > 0, np.maximum(1, np.round(0.5 * counts)), 0)
  np.testing.assert_array_equal(observed.sum(1), expected)
  assert np.all(observed <= labels)
  np.testing.assert_array_equal(labels_lib.observe(labels, 'partial', 0, fraction=1.0), labels)


def test_partial_positive_keeps_a_uniform_fraction_of_all_positives():
  """The paper's partial positive labels (Fig. 4): round(fraction * P) of the P positives of the
  whole split, every positive equally likely to be kept, so images may keep none."""
  labels = random_labels(3)
  total = int(labels.sum())
  observed = labels_lib.observe(labels, 'partial_positive', seed=1200, fraction=0.1)
  assert observed.sum() == round(0.1 * total) and np.all(observed <= labels)
  assert np.sum((labels.sum(1) > 0) & (observed.sum(1) == 0)) > len(labels) // 2
  np.testing.assert_array_equal(
      observed, labels_lib.observe(labels, 'partial_positive', seed=1200, fraction=0.1))
  assert not np.array_equal(observed,
                            labels_lib.observe(labels, 'partial_positive', seed=1201, fraction=0.1))
  np.testing.assert_array_equal(labels_lib.observe(labels, 'partial_positive', 0, fraction=1.0),
                                labels)
  # Uniform: over 300 seeds each positive entry is kept about 30% of the time (binomial std
  # 0.026; 0.12 is 4.5 of them), and no negative ever.
  kept = np.mean(
      [labels_lib.observe(labels, 'partial_positive', seed, fraction=0.3) for seed in range(300)],
      axis=0)
  assert np.all(np.abs(kept[labels == 1] - 0.3) < 0.12) and np.all(kept[labels == 0] == 0)
  # Unlike 'partial', which keeps at least one positive of every image.
  per_image = labels_lib.observe(labels, 'partial', seed=1200, fraction=0.1)
  assert np.all(per_image.sum(1) == (labels.sum(1) > 0))
  assert labels_lib.scenario_name('partial_positive', 0.10) == 'partial_positive 0.1'
  assert labels_lib.scenario_name('single_positive', 0.5) == 'single_positive'
  with pytest.raises(ValueError, match='keeps none of the'):
    labels_lib.observe(labels, 'partial_positive', 0, fraction=1e-6)
  with pytest.raises(ValueError,
                     match="config.positive_fraction=None: scenario 'partial_positive'"):
    labels_lib.observe(labels, 'partial_positive', 0)


def test_full_is_a_copy_and_errors_are_clear():
  labels = random_labels(2)
  observed = labels_lib.observe(labels, 'full', seed=0)
  np.testing.assert_array_equal(observed, labels)
  assert observed is not labels
  with pytest.raises(ValueError, match="Unknown label scenario 'some'"):
    labels_lib.observe(labels, 'some', 0)
  with pytest.raises(ValueError, match='fraction'):
    labels_lib.observe(labels, 'partial', 0)
  bad = labels.copy()
  bad[3, 4] = -1
  with pytest.raises(ValueError, match='image 3, label 4'):
    labels_lib.observe(bad, 'full', 0)


def test_validation_split_is_cole_et_al():
  train, validation = labels_lib.validation_split(101, seed=1200)
  perm = np.random.RandomState(1200).permutation(101)
  assert len(validation) == 20
  np.testing.assert_array_equal(train, np.sort(perm[:81]))
  np.testing.assert_array_equal(validation, np.sort(perm[-20:]))
