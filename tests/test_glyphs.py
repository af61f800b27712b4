"""The paper's regime offline: the glyph pretraining source, the VOC-like target, and
init_from='workdir:DIR' (hml_jax/datasets/glyphs.py, init_from.load)."""
import hashlib
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from hml_jax import init_from, methods, models
from hml_jax.datasets import glyphs
from hml_jax.init_from import embedded
from hml_jax.state import train_state, workdir_files
from hml_jax.training import train

from helpers import tiny_config


def _examples(generator, split, config):
  return list(generator(split, config))


def digest(image):
  return hashlib.sha256(image.tobytes()).hexdigest()


def test_target_has_voc_like_label_statistics_and_planted_pairs():
  examples = _examples(glyphs.generate_target, 'train', glyphs.GlyphConfig(num_train=1500))
  labels = np.stack([e[2] for e in examples]).astype(float)
  assert labels.shape[1] == 20 == len(glyphs.TARGET_LABELS)
  positives = labels.sum(1).mean()
  assert 1.3 <= positives <= 2.0, positives
  # Single positive labels leave this share of the unobserved labels positive (VOC ~2%).
  assert 0.02 <= (positives - 1) / 19 <= 0.05
  assert labels.sum(1).min() >= 1
  co_occurrence = labels.T @ labels / len(labels)
  np.fill_diagonal(co_occurrence, 0)
  for a, b in glyphs.PARTNER_PAIRS:  # each label's most frequent companion is its partner
    assert np.argmax(co_occurrence[a]) == b and np.argmax(co_occurrence[b]) == a


def test_generation_is_deterministic():
  config = glyphs.GlyphConfig(image_size=32,
                              num_train=20,
                              num_test=10,
                              min_glyph_size=9,
                              max_glyph_size=14)
  for generator in (glyphs.generate_target, glyphs.generate_pretraining, glyphs.generate_source):
    first, second = _examples(generator, 'test', config), _examples(generator, 'test', config)
    for (i, image, labels), (j, image2, labels2) in zip(first, second):
      assert i == j
      np.testing.assert_array_equal(image, image2)
      np.testing.assert_array_equal(labels, labels2)


def test_pretraining_never_sees_the_target_or_its_sources(monkeypatch):
  """The source task reads no scikit-learn digit, renders no digit and no Greek letter, and none
  of its images is one of the target's validation or test images."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError('pretraining read the target\'s source digits')

  config = glyphs.GlyphConfig(image_size=32,
                              num_train=300,
                              num_test=50,
                              min_glyph_size=9,
                              max_glyph_size=14)
  target = {split: _examples(glyphs.generate_target, split, config) for split in ('train', 'test')}
  monkeypatch.setattr(sklearn.datasets, 'load_digits', refuse)
  glyphs.glyph_bank.cache_clear()
  pretraining = (_examples(glyphs.generate_pretraining, 'train', config) +
                 _examples(glyphs.generate_pretraining, 'test', config))
  assert not set(glyphs.PRETRAINING_CLASSES) & set(glyphs.TARGET_LABELS)
  assert not set(glyphs.PRETRAINING_CLASSES) & set('0123456789')
  rendered = {
      character for character, _ in glyphs.glyph_bank(glyphs.PRETRAINING_CLASSES, glyphs.FONT_FILES)
  }
  assert rendered == set(glyphs.PRETRAINING_CLASSES)

  # The target's train split holds the validation images (20% of it) and the test split.
  target_images = {digest(image) for split in target.values() for _, image, _ in split}
  assert not target_images & {digest(image) for _, image, _ in pretraining}


def test_strong_source_never_sees_the_target_or_its_sources(monkeypatch):
  """glyph_source (docs/results.md, "When HML helps"): hundreds of classes, none a target label
  or the capital of one, every class rendered from a font that has it, no scikit-learn digit
  read, and none of its images one of the target's."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError('the source read the target\'s source digits')

  config = glyphs.GlyphConfig(num_train=400, num_test=50)
  target = [
      e for split in ('train', 'test') for e in _examples(glyphs.generate_target, split, config)
  ]
  monkeypatch.setattr(sklearn.datasets, 'load_digits', refuse)
  source = (_examples(glyphs.generate_source, 'train', config) +
            _examples(glyphs.generate_source, 'test', config))
  classes = set(glyphs.SOURCE_CLASSES)
  assert len(glyphs.SOURCE_CLASSES) == len(classes) == 190
  assert not classes & set(glyphs.TARGET_LABELS)
  assert not classes & set('0123456789') and not classes & set('ΑΒΓΔΕΖΘΛΠΩ')
  bank = glyphs.source_bank()
  assert set(bank) == classes and all(inks for inks in bank.values())
  labels = np.stack([e[2] for e in source])
  assert labels.shape[1] == 190 and 1 <= labels.sum(1).min() and labels.sum(1).max() <= 3

  assert not {digest(e[1]) for e in target} & {digest(e[1]) for e in source}


def test_blocky_glyphs_are_made_as_the_targets_digits(monkeypatch):
  """A blocky glyph is an 8x8 image of 17 grey levels (0..16, as scikit-learn's digits) enlarged
  by the very function that enlarges the target's digits."""
  from hml_jax.datasets import composite_digits  # pylint: disable=g-import-not-at-top
  enlarged = []
  enlarge = composite_digits._digit_patch  # pylint: disable=protected-access

  def record(levels, size):
    enlarged.append(levels)
    return enlarge(levels, size)

  monkeypatch.setattr(composite_digits, '_digit_patch', record)
  ink = glyphs.source_bank()['ж'][0]
  patch = glyphs._blocky(ink, 12, np.random.RandomState(0))  # pylint: disable=protected-access
  (levels,) = enlarged
  assert levels.shape == (8, 8) and levels.max() == 16 and levels.min() == 0
  np.testing.assert_array_equal(levels, np.round(levels))
  np.testing.assert_array_equal(patch, enlarge(levels, 12))
  monkeypatch.undo()
  config = glyphs.GlyphConfig(num_train=30, num_test=10)
  first = _examples(glyphs.generate_source, 'train', config)
  never = glyphs.GlyphConfig(num_train=30, num_test=10, blocky_probability=0.0)
  assert any((a[1] != b[1]).any()
             for a, b in zip(first, _examples(glyphs.generate_source, 'train', never)))


def test_target_train_and_test_use_disjoint_fonts_and_digits():
  assert set(glyphs.TEST_FONTS) < set(glyphs.FONT_FILES)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from hml_jax.datasets import composite_digits  # pylint: disable=g-import-not-at-top
  train_sources, test_sources = composite_digits.split_sources(
      load_digits().target,
      glyphs.GlyphConfig().test_source_fraction,
      glyphs.GlyphConfig().seed)
  assert not set(train_sources) & set(test_sources)


def _glyph_config(tfds_dir, name, **overrides):
  config = tiny_config(tfds_dir, **overrides)
  config.dataset.name = name
  return config


@pytest.fixture(scope='module')
def pretrained_workdir(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('glyph_pretraining'))
  config = _glyph_config(tfds_dir,
                         'glyph_pretraining',
                         loss='bce',
                         label_scenario='full',
                         num_epochs=1)
  results = train.train_and_evaluate(config, workdir)
  assert len(results['per_class_ap']) == 32
  return workdir


def _state_from_init_from(config):
  """(model, HML train state) for glyph_digits with the backbone config.init_from names."""
  method = methods.get_method('hml')
  model = models.create_model(config.model, method.head, 20)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config),
                                         model,
                                         method,
                                         jax.random.key(1), (32, 32, 1),
                                         backbone=init_from.load(config.init_from, model,
                                                                 (32, 32, 1)))
  return model, state


def _assert_same_backbone(state, workdir):
  """state's backbone parameters and statistics are those of workdir's best checkpoint."""
  _, _, source = train_state.load_trained_state(workdir, 'best')
  for new, old in ((state.params['model']['backbone'], source.params['model']['backbone']),
                   (state.batch_stats['backbone'], source.batch_stats['backbone'])):
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_init_from_workdir_takes_the_source_backbone(tfds_dir, pretrained_workdir):
  config = _glyph_config(tfds_dir, 'glyph_digits', init_from=f'workdir:{pretrained_workdir}')
  model, state = _state_from_init_from(config)
  _assert_same_backbone(state, pretrained_workdir)
  assert state.params['model']['head']['label_embeddings'].shape[1] == 20  # a fresh head
  results = train.train_and_evaluate(config, os.path.join(pretrained_workdir, '..', 'target'))
  assert len(results['per_class_ap']) == 20 and list(results['per_class_ap'])[10] == 'α'


def test_init_from_workdir_errors(tfds_dir, pretrained_workdir, tmp_path):
  config = _glyph_config(tfds_dir, 'glyph_digits', init_from=f'workdir:{tmp_path / "absent"}')
  with pytest.raises(FileNotFoundError, match=r'absent holds no hml_jax run \(no config.json\)'):
    train.train_and_evaluate(config, str(tmp_path / 'run1'))
  config.init_from = f'workdir:{pretrained_workdir}'
  config.model = 'resnet_small'
  config.image_size = 32
  with pytest.raises(ValueError,
                     match=r"backbone is 'resnet_tiny', but config.model is "
                     r"'resnet_small'"):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))
  empty = tmp_path / 'unfinished'
  os.makedirs(empty / 'best')
  (empty / 'config.json').write_text(open(os.path.join(pretrained_workdir, 'config.json')).read())
  config = _glyph_config(tfds_dir, 'glyph_digits', init_from=f'workdir:{empty}')
  with pytest.raises(FileNotFoundError, match=r'has not finished \(no results.json\)'):
    train.train_and_evaluate(config, str(tmp_path / 'run3'))
  assert not os.path.exists(tmp_path / 'run3' / 'config.json')


def test_exported_backbone_round_trips_and_starts_a_run(tfds_dir, pretrained_workdir, tmp_path,
                                                        monkeypatch):
  """embedded_backbones.export_workdir writes the best checkpoint's backbone; init_from=
  'embedded:NAME' gives exactly those arrays, after checking the file's SHA-256."""
  path = tmp_path / 'weights' / 'tiny_backbone.safetensors'
  metadata = embedded.export_workdir(pretrained_workdir, str(path))
  assert metadata['model'] == 'resnet_tiny' and json.loads(metadata['image_shape']) == [32, 32, 1]
  monkeypatch.setattr(embedded, 'DIRECTORY', str(tmp_path / 'weights'))
  monkeypatch.setitem(
      embedded.BACKBONES, 'tiny_backbone',
      embedded.EmbeddedBackbone('tiny_backbone.safetensors', 'resnet_tiny', 'glyph_pretraining',
                                embedded.sha256_of(str(path)), 'the test'))
  config = _glyph_config(tfds_dir, 'glyph_digits', init_from='embedded:tiny_backbone')
  model, state = _state_from_init_from(config)
  _assert_same_backbone(state, pretrained_workdir)
  # A changed file is refused, naming the file and the command that rebuilds it.
  with open(path, 'r+b') as f:
    f.seek(-4, os.SEEK_END)
    f.write(b'\0\0\0\1')
  with pytest.raises(ValueError,
                     match=r'tiny_backbone.safetensors has SHA-256 .* rebuild it '
                     r'with: the test'):
    init_from.load(config.init_from, model, (32, 32, 1))


def test_embedded_backbone_errors():
  with pytest.raises(ValueError,
                     match=r"no embedded backbone 'nope'; hml_jax ships "
                     r'embedded:glyph_resnet_small'):
    init_from.check('embedded:nope', 'resnet_small')
  with pytest.raises(ValueError,
                     match=r"is a resnet_small backbone, but config.model is "
                     r"'resnet50': set --config.model=resnet_small"):
    init_from.check('embedded:glyph_resnet_small', 'resnet50')


@pytest.mark.parametrize('name', sorted(embedded.BACKBONES))
def test_committed_glyph_backbone_is_what_its_command_makes(name):
  """The shipped files: pinned by their SHA-256, shaped for glyph_digits with their own network, and made
  by their source config as it is now (a changed config would not regenerate them). The bitwise
  regeneration itself (15 minutes to an hour) runs with HML_JAX_REGENERATE_BACKBONE=1:
  test_regenerating_the_glyph_backbone_is_bitwise."""
  import importlib  # pylint: disable=g-import-not-at-top
  from hml_jax.configs import glyph_digits  # pylint: disable=g-import-not-at-top
  backbone = embedded.BACKBONES[name]
  path = embedded.path_of(name)
  assert backbone.sha256 and embedded.sha256_of(path) == backbone.sha256
  variables, metadata = embedded.load(path)
  source = json.loads(metadata['source_config'])
  source.pop('hml_jax_workdir_format', None)
  source_config = importlib.import_module(f'configs.{backbone.source_config}').get_config()
  assert source == json.loads(
      json.dumps(workdir_files.without_later_defaults(source_config.to_dict())))
  assert metadata['regenerate'] == backbone.regenerate
  assert metadata['source_dataset'] == f'{source_config.dataset.name}/default'
  assert metadata['model'] == backbone.model
  assert glyph_digits.BACKBONE_MODELS[name] == backbone.model
  assert glyph_digits.get_config(name).init_from == f'embedded:{name}'
  config = glyph_digits.with_backbone(glyph_digits.get_config(), f'embedded:{name}')
  assert config.model == backbone.model
  model = models.create_model(config.model, 'cosine', 20)
  init_from.check_fits(variables, model, (config.image_size,) * 2 + (1,), f'embedded:{name}')


def test_saved_backbone_files_are_the_same_bytes_whatever_the_metadata_order(tmp_path):
  """safetensors writes metadata in a Rust HashMap's order, which varies between processes;
  save() sorts the header, so that equal tensors and metadata make one file (one SHA-256)."""
  variables = {
      'params': {
          'conv': {
              'kernel': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
          }
      },
      'batch_stats': {
          'bn': {
              'mean': np.ones(3, np.float32)
          }
      }
  }
  metadata = {f'key{index}': str(index) for index in range(12)}
  embedded.save(variables, str(tmp_path / 'a.safetensors'), metadata)
  embedded.save(variables, str(tmp_path / 'b.safetensors'), dict(reversed(list(metadata.items()))))
  assert (tmp_path / 'a.safetensors').read_bytes() == (tmp_path / 'b.safetensors').read_bytes()
  header_length = int.from_bytes((tmp_path / 'a.safetensors').read_bytes()[:8], 'little')
  assert header_length % 8 == 0
  loaded, loaded_metadata = embedded.load(str(tmp_path / 'a.safetensors'))
  assert loaded_metadata == metadata
  np.testing.assert_array_equal(loaded['params']['conv']['kernel'],
                                variables['params']['conv']['kernel'])
  np.testing.assert_array_equal(loaded['batch_stats']['bn']['mean'], np.ones(3, np.float32))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('HML_JAX_REGENERATE_BACKBONE') != '1',
                    reason='15 minutes to an hour on 2 cores: set HML_JAX_REGENERATE_BACKBONE=1')
@pytest.mark.parametrize('name', sorted(embedded.BACKBONES))
def test_regenerating_the_glyph_backbone_is_bitwise(tmp_path, name):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  backbone = embedded.BACKBONES[name]
  # The committed file's name, so that the export writes the same metadata (its 'regenerate').
  regenerated = tmp_path / 'export' / backbone.filename
  command = backbone.regenerate.replace('runs/regime', str(tmp_path)).replace(
      f'hml_jax/weights/{backbone.filename}', str(regenerated))
  # The command as a user runs it: XLA's default optimization level, not the suite's level 0
  # (tests/conftest.py), which rounds differently and made a backbone 0.2 points apart.
  xla_flags = ' '.join(flag for flag in os.environ.get('XLA_FLAGS', '').split()
                       if not flag.startswith('--xla_backend_optimization_level'))
  (tmp_path / 'export').mkdir()
  subprocess.run(command,
                 shell=True,
                 cwd=root,
                 check=True,
                 env={
                     **os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds'),
                     'XLA_FLAGS': xla_flags,
                     'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'xla_cache')
                 })
  assert embedded.sha256_of(str(regenerated)) == backbone.sha256


@pytest.mark.slow
def test_features_of_the_embedded_backbone(tfds_dir, tmp_path):
  """extract_features from a config (no training): the embedded backbone's outputs on the
  target's official splits, in official order, without flips."""
  from hml_jax.configs import glyph_digits  # pylint: disable=g-import-not-at-top
  from hml_jax.training import extract_features  # pylint: disable=g-import-not-at-top
  from hml_jax.datasets import registry  # pylint: disable=g-import-not-at-top
  config = glyph_digits.get_config()
  config.dataset.builder_config = 'tiny'
  config.dataset.data_dir = str(tfds_dir)
  arrays = extract_features.extract_initial_to_file(config, str(tmp_path / 'f.npz'))
  source = registry.load_source(config.dataset)
  # The default backbone's 512 features (resnet_small_wide).
  assert arrays['train_features'].shape == (200, 512) and arrays['test_features'].shape[0] == 80
  np.testing.assert_array_equal(arrays['test_labels'], source.test_labels)
  variables, _ = embedded.load_named(config.init_from)
  model = models.create_model(config.model, 'cosine', 20)
  images = (source.test_examples[:16].astype(np.float32) / 255.0 - 0.5) / 0.5
  expected = model.backbone.apply(variables, images, train=False)
  np.testing.assert_allclose(arrays['test_features'][:16],
                             np.asarray(expected),
                             rtol=1e-4,
                             atol=1e-4)


def test_glyph_digits_names_every_shipped_backbone_and_starts_from_the_strong_one():
  """configs/glyph_digits.py:NAME for every shipped backbone, with its network; the default is
  the backbone that meets docs/results.md's criterion; an unknown name says which exist."""
  from hml_jax.configs import glyph_digits  # pylint: disable=g-import-not-at-top
  assert set(glyph_digits.BACKBONE_MODELS) == set(embedded.BACKBONES)
  assert glyph_digits.CONTRAST_BACKBONE in glyph_digits.BACKBONE_MODELS
  config = glyph_digits.get_config()
  assert (config.init_from, config.model) == ('embedded:glyph_source_decay_resnet_small_wide',
                                              'resnet_small_wide')
  with pytest.raises(ValueError, match='glyph_resnet_small'):
    glyph_digits.get_config('glyph_resnet')


def test_with_backbone_takes_the_embedded_backbones_network():
  from hml_jax.configs import glyph_digits  # pylint: disable=g-import-not-at-top
  config = glyph_digits.with_backbone(glyph_digits.get_config(), 'embedded:glyph_resnet_small')
  assert (config.init_from, config.model) == ('embedded:glyph_resnet_small', 'resnet_small')
  for name, backbone in embedded.BACKBONES.items():
    assert glyph_digits.with_backbone(glyph_digits.get_config(),
                                      f'embedded:{name}').model == (backbone.model)
  config = glyph_digits.with_backbone(glyph_digits.get_config('glyph_resnet_small'),
                                      'torchvision:resnet18')
  assert (config.init_from, config.model) == ('torchvision:resnet18', 'resnet_small')
