import numpy as np
import tensorflow_datasets as tfds

from hml_jax.datasets import composite_digits


def build(data_dir):
  builder = tfds.builder('composite_digits/tiny', data_dir=str(data_dir))
  builder.download_and_prepare()
  arrays = {}
  for split in ('train', 'test'):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    order = np.argsort(data['index'])
    arrays[split] = (data['image'][order], data['labels'][order])
  return builder, arrays


def test_builds_offline_and_deterministically(tmp_path):
  builder, first = build(tmp_path / 'a')
  _, second = build(tmp_path / 'b')
  assert builder.info.splits['train'].num_examples == 240
  assert builder.info.splits['test'].num_examples == 80
  for split in ('train', 'test'):
    np.testing.assert_array_equal(first[split][0], second[split][0])
    np.testing.assert_array_equal(first[split][1], second[split][1])
  images, labels = first['train']
  assert images.shape == (240, 32, 32, 1) and images.dtype == np.uint8
  assert labels.shape == (240, 10) and set(np.unique(labels)) <= {0, 1}
  assert np.all(labels.sum(1) >= 1)
  assert builder.info.metadata['label_names'] == list('0123456789')


def test_train_and_test_use_disjoint_source_digits():
  from sklearn.datasets import load_digits
  targets = load_digits().target
  train, test = composite_digits.split_sources(targets, 0.4, seed=0)
  assert not set(train) & set(test)
  assert len(train) + len(test) == len(targets)
  for digit in range(10):  # stratified
    assert abs(np.mean(targets[test] == digit) - np.mean(targets == digit)) < 0.01


def test_planted_partner_pairs_co_occur_most():
  config = composite_digits.GeneratorConfig()
  rng = np.random.RandomState(0)
  labels = np.zeros((4000, 10))
  for i in range(len(labels)):
    labels[i, composite_digits.sample_label_set(rng, config)] = 1
  # Lift P(a, b) / (P(a) P(b)): partners far above 1, every other pair below.
  marginal = labels.mean(0)
  lift = (labels.T @ labels / len(labels)) / np.outer(marginal, marginal)
  partners = np.zeros((10, 10), bool)
  for a, b in composite_digits.PARTNER_PAIRS:
    partners[a, b] = partners[b, a] = True
  off_diagonal = ~np.eye(10, dtype=bool)
  assert lift[partners].min() > 2.0
  assert lift[off_diagonal & ~partners].max() < 1.2
  assert 2.0 < labels.sum(1).mean() < 3.5
