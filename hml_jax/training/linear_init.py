"""Cole et al.'s linear initialization: the head trained alone on the frozen backbone's features,
then carried into end-to-end training (their train_mode 'linear_init'; hml_jax/methods/recipes.py).

The backbone (pretrained, in inference mode: BatchNorm statistics untouched, no augmentation)
computes the features of the run's training, validation and test splits once; they are kept in
WORKDIR/linear_init/features.npz. A features-mode run in WORKDIR/linear_init (configs/features.py's
loop, with its own checkpoints, so that it resumes too) trains the head for the recipe's epochs at
its learning rate and batch size on the same observed labels and splits, and its best epoch by
validation mAP gives the head (and ROLE's label estimates, HML's s*, m*) that end-to-end training
starts from, with a new optimizer state, as in Cole et al.'s code.
"""
import io
import logging
import time
from typing import Any, Dict, Tuple

import jax
import ml_collections
import numpy as np

from hml_jax.data import splits
from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import sharding
from hml_jax.state import train_state
from hml_jax.training import extract_features
from hml_jax.training import input_pipeline
from hml_jax.training import loop

SUBDIRECTORY = 'linear_init'
SPLITS = ('train', 'validation', 'test')


def head_config(config, recipe) -> ml_collections.ConfigDict:
  """The features-mode config of the head's phase: the run's loss and labels, no backbone, the
  recipe's epochs, learning rate and batch size, one plain loop (no recipe of its own)."""
  result = ml_collections.ConfigDict(config.to_dict())
  result.model = 'identity'
  result.init_from = ''
  result.half_precision = False
  result.augment_max_shift = 0
  result.num_epochs = recipe.linear_init_epochs
  result.learning_rate = recipe.linear_init_learning_rate
  result.batch_size = recipe.linear_init_batch_size
  result.recipe = 'shared'
  result.linear_init_epochs, result.head_learning_rate_multiplier = 0, 1.0
  result.early_stopping_patience, result.early_stopping_drop = 0, 0.0
  # The run's schedule and measurements are the end-to-end phase's, not the head's.
  result.learning_rate_decay_epochs, result.false_negative_images = (), 0
  return result


def _extract(config, state, data, mesh) -> Dict[str, np.ndarray]:
  return {
      name:
          extract_features.extract(state, config, getattr(data, name), config.eval_batch_size, mesh)
      for name in SPLITS
  }


def features_data(config, state, data, mesh, path) -> input_pipeline.Data:
  """The run's splits as features of the frozen backbone, computed once and kept at path."""
  if files.exists(path):
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as arrays:
      features = {name: arrays[name] for name in SPLITS}
  else:
    features = _extract(config, state, data, mesh)
    if jax.process_index() == 0:
      buffer = io.BytesIO()
      np.savez(buffer, **features)
      files.write_bytes(path, buffer.getvalue())  # atomic on a local disk, whole on a bucket
  feature_splits = {}
  for name in SPLITS:
    split = getattr(data, name)
    if len(features[name]) != len(split):
      raise errors.InvalidInputError(
          f'{path} holds {len(features[name])} {name} features for a split of '
          f'{len(split)}: it belongs to another dataset; remove it.')
    feature_splits[name] = splits.ArraySplit(features[name], split.labels, split.observed)
  return input_pipeline.Data(train=feature_splits['train'],
                             validation=feature_splits['validation'],
                             test=feature_splits['test'],
                             label_names=data.label_names)


def train_head(config, recipe, workdir, data, state, mesh) -> Tuple[Any, Dict[str, Any]]:
  """(state with the head phase's best head, {'best_epoch', 'val_map', 'test_map'} of it)."""
  if jax.process_count() > 1:
    raise errors.InvalidInputError(
        'config.linear_init_epochs > 0 (Cole et al.\'s linear init, the published recipe of '
        f'{config.loss!r}) runs in one process for now; set --config.linear_init_epochs=0 or '
        "--config.recipe=shared to train end to end on many hosts.")
  start = time.time()
  subdirectory = files.join(workdir, SUBDIRECTORY)
  files.makedirs(subdirectory)
  logging.info(
      'Linear init (Cole et al.): the head alone for %d epochs on the frozen '
      "backbone's features, in %s.", recipe.linear_init_epochs, subdirectory)
  head_data = features_data(config, state, data, mesh, files.join(subdirectory, 'features.npz'))
  results = loop.train_and_evaluate(head_config(config, recipe), subdirectory, data=head_data)
  _, _, head_state = train_state.load_trained_state(subdirectory, 'best', mesh)
  params = dict(state.params)
  params['model'] = {**state.params['model'], 'head': head_state.params['model']['head']}
  for key in ('estimator', 'scale_margin'):
    if key in head_state.params:
      params[key] = head_state.params[key]
  # A new optimizer state, as Cole et al. build a new optimizer for the end-to-end phase: the
  # state's Adam moments are still the zeros of create_train_state. Labels that the head phase
  # changed (LL-Cp's corrections, EM+APL's pseudo-labels) go on from where it left them.
  state = state.replace(params=params)
  if head_state.observed_labels is not None:
    state = state.replace(observed_labels=head_state.observed_labels)
  state = sharding.place(
      state,
      train_state.train_state_shardings(train_state.StateSettings.from_config(config), state, mesh))
  summary = {key: results[key] for key in ('best_epoch', 'val_map', 'test_map')}
  summary['wall_seconds'] = time.time() - start  # this call's, extraction included
  logging.info(
      'Linear init done: best epoch %d, val mAP %.2f, test mAP %.2f; now %d epochs end '
      'to end.', summary['best_epoch'], summary['val_map'], summary['test_map'], config.num_epochs)
  return state, summary
