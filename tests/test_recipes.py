"""Each baseline's published training recipe (hml_jax/methods/recipes.py, hml_jax/training/linear_init.py)."""
import importlib
import json
import os

import jax
import numpy as np
import pytest

from hml_jax import methods, models
from hml_jax.methods import recipes
from hml_jax.state import sharding, steps, train_state
from hml_jax.training import input_pipeline, linear_init, train

from helpers import tiny_config


@pytest.mark.parametrize(
    'config_name,loss,expected',
    [
        ('voc', 'role',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-3, linear_init_batch_size=16)),
        ('coco', 'an_ls',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-4, linear_init_batch_size=8)),
        ('cub', 'role',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-3, linear_init_batch_size=8)),
        ('cub', 'an_ls',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-4, linear_init_batch_size=8)),
        ('nus', 'role',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-3, linear_init_batch_size=16)),
        ('nus', 'an_ls',
         recipes.Recipe(
             linear_init_epochs=25, linear_init_learning_rate=1e-4, linear_init_batch_size=16)),
        ('voc', 'll_cp', recipes.Recipe(head_learning_rate_multiplier=10.0,
                                        early_stopping_drop=3.0)),
        ('coco', 'em_apl', recipes.Recipe(early_stopping_patience=1)),
        ('voc', 'em', recipes.Recipe(early_stopping_patience=1)),
        ('voc', 'hml', recipes.Recipe()),
        ('voc', 'an', recipes.Recipe()),
        ('default', 'role', recipes.Recipe()),  # the embedded default: one shared loop
        ('default', 'll_r', recipes.Recipe()),
    ])
def test_paper_configs_use_the_published_recipes(config_name, loss, expected):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  config.loss = loss
  assert recipes.from_config(config) == expected


def test_recipe_keys_override_and_bad_values_are_named():
  config = importlib.import_module('configs.voc').get_config()
  config.loss = 'll_r'
  config.head_learning_rate_multiplier = 1.0
  config.early_stopping_patience = 2
  assert recipes.from_config(config) == recipes.Recipe(early_stopping_patience=2,
                                                       early_stopping_drop=3.0)
  config.recipe = 'shared'
  config.linear_init_epochs = 5
  with pytest.raises(ValueError,
                     match=r'linear_init_epochs=5 needs a positive '
                     r'config.linear_init_learning_rate'):
    recipes.from_config(config)
  config.recipe = 'authors'
  with pytest.raises(ValueError, match=r"config.recipe='authors'.*'published', 'shared'"):
    recipes.from_config(config)


@pytest.mark.parametrize(
    'maps,patience,drop,stops',
    [
        ([50.0], 1, 0.0, False),
        ([50.0, 51.0], 1, 0.0, False),
        ([50.0, 49.0], 1, 0.0, True),  # Zhou et al.: the first epoch that is not a new best
        ([50.0, 50.0], 1, 0.0, True),  # a tie is not a new best
        ([50.0, 49.0], 2, 0.0, False),
        ([50.0, 49.0, 49.5], 2, 0.0, True),
        ([60.0, 58.0], 0, 3.0, False),  # Kim et al.: more than 3 points below the best
        ([60.0, 56.9], 0, 3.0, True),
        ([60.0, 40.0], 0, 0.0, False),  # the shared loop never stops
    ])
def test_should_stop(maps, patience, drop, stops):
  recipe = recipes.Recipe(early_stopping_patience=patience, early_stopping_drop=drop)
  assert recipes.should_stop(recipe, maps) == stops


@pytest.mark.slow
def test_kim_head_learning_rate_is_ten_times_the_backbone_one():
  """Adam's first step moves every parameter by its learning rate (times the gradient's sign)."""
  config = tiny_config('unused', loss='ll_r', recipe='published', learning_rate=1e-3)
  method = methods.get_method('ll_r')
  model = models.create_model('resnet_tiny', method.head, num_labels=10)
  state = train_state.create_train_state(train_state.StateSettings.from_config(config), model,
                                         method, jax.random.key(0), (32, 32, 1))
  gradients = jax.tree_util.tree_map(np.ones_like, state.params)
  moved = jax.tree_util.tree_map(lambda new, old: np.abs(np.asarray(new) - np.asarray(old)),
                                 state.apply_gradients(grads=gradients).params, state.params)
  np.testing.assert_allclose(moved['model']['head']['classifier']['kernel'], 1e-2, rtol=1e-3)
  np.testing.assert_allclose(moved['model']['backbone']['conv1']['kernel'], 1e-3, rtol=1e-3)
  config.recipe = 'shared'
  state = train_state.create_train_state(train_state.StateSettings.from_config(config), model,
                                         method, jax.random.key(0), (32, 32, 1))
  moved = jax.tree_util.tree_map(lambda new, old: np.abs(np.asarray(new) - np.asarray(old)),
                                 state.apply_gradients(grads=gradients).params, state.params)
  np.testing.assert_allclose(moved['model']['head']['classifier']['kernel'], 1e-3, rtol=1e-3)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch_and_resumes_finished(tfds_dir, tmp_path, monkeypatch):
  """EM under Zhou et al.'s recipe stops at the first epoch whose validation mAP is no new best;
  the scores are scripted (evaluate is called for validation, then test, each epoch)."""
  scripted = iter([0.30, 0.29, 0.32, 0.31, 0.31, 0.30, 0.20, 0.20])

  def fake_evaluate(eval_fn, state, split, config, mesh):
    del eval_fn, state, config, mesh
    return {'map': next(scripted), 'per_class_ap': np.full(split.labels.shape[1], 0.5)}

  monkeypatch.setattr(steps, 'evaluate', fake_evaluate)
  config = tiny_config(tfds_dir, loss='em', recipe='published', num_epochs=5)
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert [e['val_map'] for e in results['epochs']] == [30.0, 32.0, 31.0]
  assert results['best_epoch'] == 2 and results['test_map'] == 31.0
  assert results['stopped_early'] and results['recipe']['early_stopping_patience'] == 1
  # The same command again trains nothing more: the stop holds on resume.
  again = train.train_and_evaluate(config, workdir)
  assert len(again['epochs']) == 3


@pytest.mark.slow
def test_linear_init_trains_the_head_on_frozen_features_then_carries_it(tfds_dir, tmp_path):
  """ROLE under Cole et al.'s recipe: the head phase sees the backbone's inference-mode features
  of the run's own splits and observed labels; its best head and label estimates start the
  end-to-end phase; a second call reuses the finished phase."""
  config = tiny_config(tfds_dir,
                       loss='role',
                       recipe='published',
                       linear_init_epochs=2,
                       linear_init_batch_size=32)
  recipe = recipes.from_config(config)
  method = methods.get_method('role')
  data = input_pipeline.load(config)
  mesh = sharding.create_mesh()
  model = models.create_model(config.model, method.head, len(data.label_names))
  state = train_state.create_train_state(train_state.StateSettings.from_config(config),
                                         model,
                                         method,
                                         jax.random.key(0),
                                         data.train.example_shape,
                                         observed_labels=data.train.observed)
  state = sharding.place(
      state,
      train_state.train_state_shardings(train_state.StateSettings.from_config(config), state, mesh))
  backbone_before = jax.device_get(state.params['model']['backbone'])
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  new_state, summary = linear_init.train_head(config, recipe, workdir, data, state, mesh)

  subdirectory = os.path.join(workdir, 'linear_init')
  with open(os.path.join(subdirectory, 'results.json')) as f:
    head_results = json.load(f)
  assert head_results['config']['model'] == 'identity'
  assert head_results['config']['learning_rate'] == 1e-3 and len(head_results['epochs']) == 2
  keys = ('best_epoch', 'val_map', 'test_map')
  assert {key: summary[key] for key in keys} == {key: head_results[key] for key in keys}
  assert summary['wall_seconds'] > 0
  # The features: the frozen backbone in inference mode on the validation images.
  with np.load(os.path.join(subdirectory, 'features.npz')) as features:
    images = data.validation.examples[:8]
    expected = model.apply({
        'params': state.params['model'],
        'batch_stats': state.batch_stats
    },
                           steps.normalize_images(images, config.dataset.mean, config.dataset.std),
                           train=False,
                           method=lambda module, x, train: module.backbone(x, train=train))
    np.testing.assert_allclose(features['validation'][:8], expected, rtol=1e-5, atol=1e-5)
    assert features['train'].shape == (len(data.train), expected.shape[1])
  _, _, head_state = train_state.load_trained_state(subdirectory, 'best')
  for key in ('estimator',):
    np.testing.assert_array_equal(np.asarray(new_state.params[key]),
                                  np.asarray(head_state.params[key]))
  np.testing.assert_array_equal(
      np.asarray(new_state.params['model']['head']['classifier']['kernel']),
      np.asarray(head_state.params['model']['head']['classifier']['kernel']))
  for new, old in zip(jax.tree_util.tree_leaves(new_state.params['model']['backbone']),
                      jax.tree_util.tree_leaves(backbone_before)):
    np.testing.assert_array_equal(np.asarray(new), old)
  again, summary_again = linear_init.train_head(config, recipe, workdir, data, state, mesh)
  assert {key: summary_again[key] for key in keys} == {key: summary[key] for key in keys}
  np.testing.assert_array_equal(np.asarray(again.params['estimator']),
                                np.asarray(new_state.params['estimator']))


@pytest.mark.slow
def test_linear_init_run_end_to_end_reports_both_phases(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir,
                       loss='an_ls',
                       recipe='published',
                       linear_init_epochs=1,
                       num_epochs=1)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['linear_init']['best_epoch'] == 1 and len(results['epochs']) == 1
  assert results['recipe']['linear_init_learning_rate'] == 1e-4
