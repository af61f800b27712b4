"""Backbone features of a dataset's official train and test splits, for features mode (the
command line: hml_jax/tools/extract_features.py).

From a training workdir (its config.json names the dataset and its best or latest checkpoint gives
the backbone), or from a config: the backbone a run of that config starts from (config.init_from:
ImageNet weights, an embedded backbone, another run's), before any training, on the config's
dataset. The .npz holds train_features / train_labels (the official train split in its official
order, so features mode applies Cole et al.'s protocol to the same rows), test_features /
test_labels and label_names: what configs/features.py reads. Images are resized as for
evaluation, without flips.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS imports TensorFlow
from absl import logging
import jax
import numpy as np

from hml_jax import init_from
from hml_jax import methods
from hml_jax import models
from hml_jax.data import decoders
from hml_jax.data import splits
from hml_jax.datasets import registry
from hml_jax.runtime import errors
from hml_jax.state import sharding
from hml_jax.state import steps
from hml_jax.state import train_state


def official_splits(source, config):
  """(train, test) Splits holding the source's official splits whole, in official order."""
  if source.train_examples is not None:
    return (splits.ArraySplit(source.train_examples, source.train_labels, source.train_labels),
            splits.ArraySplit(source.test_examples, source.test_labels, source.test_labels))
  common = dict(image_size=config.image_size,
                flip=False,
                shuffle_buffer=1,
                parallel_calls=config.dataset.parallel_calls,
                decoder=decoders.image_decoder(config.dataset))
  return tuple(
      splits.ImageSplit(records, np.arange(len(labels)), labels, labels, **common)
      for records, labels in ((source.train_records, source.train_labels), (source.test_records,
                                                                            source.test_labels)))


def extract(state, config, split, batch_size, mesh) -> np.ndarray:
  """Backbone outputs (num_images, dimensions) of every image of split, in its row order."""
  outputs, rows = steps.model_outputs(state,
                                      steps.StepSettings.from_config(config),
                                      split,
                                      mesh,
                                      batch_size,
                                      method=lambda model, x, train: model.backbone(x, train=train))
  features = np.zeros((len(split), outputs.shape[1]), np.float32)
  features[rows] = outputs
  return features


def apply_dataset_overrides(config, dataset_overrides):
  """config.dataset entries replaced by 'key=value' strings, each checked against the key's type."""
  config.unlock()
  for override in dataset_overrides:
    key, _, value = override.partition('=')
    if key == 'decoder':  # also for a run saved before the key existed
      config.dataset[key] = decoders.check_decoder(value)
      continue
    if key not in config.dataset:
      raise errors.InvalidInputError(
          f'--dataset_override {override!r}: config.dataset has no key {key!r}; it '
          f'has {sorted(config.dataset)}.')
    current = config.dataset[key]
    if isinstance(current, bool):
      if value.lower() not in ('true', 'false'):
        raise errors.InvalidInputError(
            f'--dataset_override {override!r}: {key} takes true or false.')
      value = value.lower() == 'true'
    elif isinstance(current, (int, float)):
      value = type(current)(value)
    config.dataset[key] = value
  return config


def _write(state, config, mesh, output, batch_size, source=None):
  """source: config's, if already loaded (else it is loaded here)."""
  if source is None:
    source = registry.load_source(config.dataset)
  arrays = {'label_names': np.array(source.label_names, dtype=str)}
  for name, split in zip(('train', 'test'), official_splits(source, config)):
    arrays[f'{name}_features'] = extract(state, config, split, batch_size, mesh)
    arrays[f'{name}_labels'] = split.labels.astype(np.uint8)
    logging.info('%s: %s features from %s.', name, arrays[f'{name}_features'].shape, source.name)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  temporary = output + '.tmp.npz'
  np.savez(temporary, **arrays)
  os.replace(temporary, output)
  return arrays


def extract_to_file(workdir, output, which='best', batch_size=64, dataset_overrides=()):
  """Features of the backbone of workdir's best (or latest) checkpoint."""
  mesh = sharding.create_mesh()
  config, _, state = train_state.load_trained_state(workdir, which, mesh)
  return _write(state, apply_dataset_overrides(config, dataset_overrides), mesh, output, batch_size)


def extract_initial_to_file(config, output, batch_size=64):
  """Features of the backbone a run of config starts from (config.init_from: ImageNet weights, an
  embedded backbone or another run's), on config.dataset, before any training."""
  mesh = sharding.create_mesh()
  method = methods.get_method(config.loss)
  source = registry.load_source(config.dataset)
  model = models.create_model(config.model,
                              method.head,
                              len(source.label_names),
                              convolutions=config.convolutions)
  train, _ = official_splits(source, config)
  # The head and the label state are never used: only the backbone runs.
  config = config.copy_and_resolve_references()
  config.unlock()
  config.loss = 'an'
  settings = train_state.StateSettings.from_config(config)
  state = train_state.create_train_state(settings,
                                         model,
                                         methods.get_method('an'),
                                         jax.random.key(0),
                                         train.example_shape,
                                         backbone=init_from.initial_backbone(
                                             config.init_from, config.model, model,
                                             train.example_shape))
  state = sharding.place(state, train_state.train_state_shardings(settings, state, mesh))
  return _write(state, config, mesh, output, batch_size, source)
