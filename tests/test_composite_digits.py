import numpy as np
import pytest
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


def test_generated_tiny_datasets_have_the_pinned_pixels(tfds_dir):
  """A drift of the rendering (another Pillow or FreeType) is seen: each generated dataset's tiny
  configuration, prepared fresh by the suite, has the pinned digests (checked where the rendering
  versions are those the digests were pinned with; elsewhere the warning is what a user sees)."""
  from hml_jax.configs import default  # pylint: disable=g-import-not-at-top
  from hml_jax.datasets import digests, registry  # pylint: disable=g-import-not-at-top
  if digests.rendering_versions() != digests.PINNED_WITH:
    pytest.skip(f'rendering with {digests.rendering_versions()}, pinned with '
                f'{digests.PINNED_WITH}')
  for name in digests.GENERATED:
    config = default.get_config()
    config.dataset.name, config.dataset.builder_config = name, 'tiny'
    config.dataset.data_dir = str(tfds_dir)
    source = registry.tfds_source(config.dataset, in_memory=True)
    assert source.digests == digests.PINNED[source.name], source.name


def test_a_differing_dataset_is_warned_about_with_the_versions(caplog):
  from hml_jax.datasets import digests  # pylint: disable=g-import-not-at-top
  name = 'glyph_digits/tiny/2.1.0'
  assert digests.check(name, digests.PINNED[name])
  assert not digests.check(name, {**digests.PINNED[name], 'test': '0' * 64})
  assert 'the test split(s) prepared here differ' in caplog.text
  assert digests.rendering_versions() in caplog.text and digests.PINNED_WITH in caplog.text
