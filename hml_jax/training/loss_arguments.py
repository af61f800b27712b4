"""What a run's loss takes from the config: its fixed keyword arguments (loss_hyperparameters)
and those that change with the epoch (epoch_schedule), passed to state/steps.py's train step."""
import logging
from typing import Any, Dict

import numpy as np

from hml_jax.state import steps


def loss_hyperparameters(method, config, train_labels) -> Dict[str, Any]:
  """The loss's keyword arguments, each from the config key of its name. expected_num_pos < 0
  means: estimate it as the mean number of (true) positives per training image, as Cole et al.'s
  per-dataset values are."""
  values = {name: config[name] for name in method.hyperparameters}
  if values.get('expected_num_pos', 0) < 0:
    values['expected_num_pos'] = float(np.mean(np.sum(train_labels, axis=1)))
  if values:
    logging.debug('Loss %s hyperparameters: %s', config.loss, values)  # also in config.json
  return values


def delta_rel(config) -> float:
  """Large Loss's relative rate: config.delta_rel, or where it is negative the method's
  config.delta_rel_by_method (Kim et al.'s per-method, per-dataset values)."""
  if config.delta_rel >= 0:
    return config.delta_rel
  return config.delta_rel_by_method[config.loss]


def epoch_schedule(method, config, epoch: int, entries_per_batch: int) -> Dict[str, float]:
  """The train step's schedule for a 1-based epoch: the method's per-epoch loss arguments
  (method.schedule) and, with config.learning_rate_decay_epochs, the epoch's factor on the
  network's learning rate (steps.LEARNING_RATE_FACTOR)."""
  schedule = {}
  if method.schedule is not None:
    schedule = method.schedule(epoch, entries_per_batch, delta_rel(config))
  if config.learning_rate_decay_epochs:
    schedule[steps.LEARNING_RATE_FACTOR] = steps.learning_rate_factor(
        epoch, config.learning_rate_decay_epochs, config.learning_rate_decay_factor)
  return schedule
