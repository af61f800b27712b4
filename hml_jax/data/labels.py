"""Observed-label scenarios and the validation split of Cole et al. (CVPR 2021), in NumPy.

Shapes: labels (num_images, num_labels) of 0/1.
"""
import numpy as np

from hml_jax.runtime import errors

SCENARIOS = ('full', 'partial', 'partial_positive', 'single_positive')
# Scenarios that keep config.positive_fraction of the positives.
FRACTION_SCENARIOS = ('partial', 'partial_positive')


def check_binary(labels, name: str = 'labels') -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise errors.InvalidInputError(
        f'{name} must be (num_images, num_labels), got shape {labels.shape}.')
  bad = ~np.isin(labels, (0, 1))
  if bad.any():
    row, column = np.argwhere(bad)[0]
    raise errors.InvalidInputError(
        f'{name} must hold only 0 and 1; found {labels[row, column]!r} at image '
        f'{row}, label {column}.')
  return labels


def _keep_random_positives(labels: np.ndarray, count_for, seed: int) -> np.ndarray:
  """Cole et al.'s observe_uniform with num_neg = 0, generalized to a per-image positive count.

  One RandomState(seed); for each image in order: shuffle the indices of its positives, then
  shuffle the indices of its negatives (this consumes random draws although no negative is kept),
  and keep the first count_for(num_positives) positives.
  """
  rng = np.random.RandomState(seed)
  observed = np.zeros_like(labels)
  for i, row in enumerate(labels):
    positives = np.nonzero(row == 1)[0]
    rng.shuffle(positives)
    negatives = np.nonzero(row == 0)[0]
    rng.shuffle(negatives)
    observed[i, positives[:count_for(len(positives))]] = 1
  return observed


def check_fraction(scenario: str, fraction) -> None:
  """Raises ValueError naming config.positive_fraction unless a scenario that keeps a fraction
  of the positives (FRACTION_SCENARIOS) has one in (0, 1]; other scenarios ignore it."""
  if scenario in FRACTION_SCENARIOS and (fraction is None or not 0.0 < float(fraction) <= 1.0):
    raise errors.InvalidInputError(
        f'config.positive_fraction={fraction!r}: scenario {scenario!r} keeps this '
        'fraction of the positives; give one in (0, 1].')


def _keep_random_positive_entries(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """round(fraction * P) of the split's P positive (image, label) entries, drawn uniformly without
  replacement: the first of RandomState(seed).permutation over the positives in row-major order.
  An image may keep none of its positives."""
  positives = np.flatnonzero(labels == 1)
  num_kept = int(np.round(fraction * len(positives)))
  if num_kept == 0 and len(positives):
    raise errors.InvalidInputError(
        f'A positive_fraction of {fraction} keeps none of the {len(positives)} '
        "positive labels (scenario 'partial_positive'); raise "
        'config.positive_fraction.')
  kept = positives[np.random.RandomState(seed).permutation(len(positives))[:num_kept]]
  observed = np.zeros_like(labels)
  observed.flat[kept] = 1
  return observed


def observe(labels, scenario: str, seed: int, fraction=None) -> np.ndarray:
  """The observed 0/1 label matrix of a training split (0 = negative or unknown).

  scenario:
    'full': every label as given.
    'partial': keep round(fraction * n) of each image's n positives, at least one (for n >= 1):
      every image keeps a positive, so where images have few positives (VOC: 1.4 on average)
      small fractions give single positive labels.
    'partial_positive': the paper's partial positive labels (Sec. 4.3, Fig. 4): keep
      round(fraction * P) of all P positive labels of the split, drawn uniformly (image by image
      that is about `fraction` of each image's positives, and many images keep none when
      fraction is small: "with 10% positive labels" BCE drops 40% on VOC).
    'single_positive': exactly one positive per image (none if the image has none), drawn exactly
      as Cole et al.'s generate_observed_labels.py with num_pos = 1, num_neg = 0 (seed 1200 there).
  """
  labels = check_binary(labels)
  if scenario == 'full':
    return labels.copy()
  if scenario == 'single_positive':
    return _keep_random_positives(labels, lambda n: 1, seed)
  if scenario in FRACTION_SCENARIOS:
    check_fraction(scenario, fraction)
    if scenario == 'partial_positive':
      return _keep_random_positive_entries(labels, float(fraction), seed)
    return _keep_random_positives(labels, lambda n: max(1, int(np.round(float(fraction) * n))),
                                  seed)
  raise errors.InvalidInputError(
      f'Unknown label scenario {scenario!r} (config.label_scenario); choose one of '
      f'{list(SCENARIOS)}.')


def scenario_name(scenario: str, fraction=None) -> str:
  """For tables: 'single_positive', or 'partial_positive 0.1' for a scenario that keeps a
  fraction of the positives."""
  return f'{scenario} {float(fraction):g}' if scenario in FRACTION_SCENARIOS else scenario


def validation_split(num_images: int, seed: int = 1200, fraction: float = 0.2):
  """Cole et al.'s split of a training set: (train_indices, validation_indices), both sorted.

  perm = RandomState(seed).permutation(n); the last round(fraction * n) go to validation.
  """
  permutation = np.random.RandomState(seed).permutation(num_images)
  num_validation = int(np.round(fraction * num_images))
  if num_validation == 0 or num_validation == num_images:
    raise errors.InvalidInputError(
        f'A validation fraction of {fraction} of {num_images} images leaves an empty '
        'split.')
  return (np.sort(permutation[:num_images - num_validation]),
          np.sort(permutation[-num_validation:]))
