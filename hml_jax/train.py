"""Training and evaluation loop: train_and_evaluate(config, workdir)."""
import dataclasses
import functools
import logging
import time
from typing import Any, Dict, Optional

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hml_jax import checkpoints
from hml_jax import files
from hml_jax import heads
from hml_jax import input_pipeline
from hml_jax import labels as labels_lib
from hml_jax import layers
from hml_jax import losses
from hml_jax import metrics as metrics_lib
from hml_jax import models
from hml_jax import preemption
from hml_jax import pretrained
from hml_jax import recipes
from hml_jax import sharding


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # (num_train_images, num_labels) float32, only for methods that change the observed labels
  # (LL-Cp, EM + APL): they live here so that they are checkpointed with the model.
  observed_labels: Any = None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Reject unknown names before any work is done, naming the key and the choices."""
  losses.get_method(config.loss)
  models.get_backbone(config.model)
  layers.resolve_convolutions(config.convolutions)
  if config.label_scenario not in labels_lib.SCENARIOS:
    raise ValueError(f'Unknown label scenario {config.label_scenario!r} (config.label_scenario); '
                     f'choose one of {list(labels_lib.SCENARIOS)}.')
  labels_lib.check_fraction(config.label_scenario, config.get('positive_fraction'))
  if config.optimizer != 'adam':
    raise ValueError(f"Unknown optimizer {config.optimizer!r} (config.optimizer); only 'adam' "
                     '(the paper\'s) is implemented.')
  num_devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] <= 0 or config[key] % num_devices:
      raise ValueError(f'config.{key}={config[key]} must be a positive multiple of the '
                       f'{num_devices} devices it is split over.')
  if config.nonfinite not in ('stop', 'skip'):
    raise ValueError(f"config.nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}.")
  if config.num_epochs <= 0:
    raise ValueError(f'config.num_epochs must be positive, got {config.num_epochs}.')
  if (losses.get_method(config.loss).has_scale_and_margin and
      abs(config.margin) > heads.MONOTONIC_MARGIN_LIMIT):
    raise ValueError(f'config.margin={config.margin}: beyond |m| = '
                     f'{heads.MONOTONIC_MARGIN_LIMIT:.4f} rad the margin sigmoid is no longer '
                     'increasing in the cosine (heads.cos_with_margin); the paper uses 0-0.4.')
  if config.get('adaptive_optimizer', 'separate') not in ADAPTIVE_OPTIMIZERS:
    raise ValueError(f'Unknown config.adaptive_optimizer={config.adaptive_optimizer!r}; choose '
                     f'one of {list(ADAPTIVE_OPTIMIZERS)}.')
  if config.get('init_from'):
    pretrained.check_spec(config.init_from, config.model)
  recipes.resolve(config)
  sharding.check_parameter_sharding(*parameter_layout(config))


def parameter_layout(config):
  """(config.parameter_sharding, config.fsdp_min_size); configs saved before these keys existed
  (a workdir's config.json) get the values that runs had then (replicated)."""
  return tuple(config.get(key, checkpoints.ADDED_KEYS[key])
               for key in ('parameter_sharding', 'fsdp_min_size'))


ADAPTIVE_OPTIMIZERS = ('separate', 'shared')


def create_optimizer(config) -> optax.GradientTransformation:
  """Adam over everything. s* and m* (adaptive HML) get config.adaptive_learning_rate with
  config.adaptive_optimizer='separate', or the network's learning rate with 'shared' (the paper's
  literal reading: they are learnable parameters like the rest; Adam is elementwise, so this is
  one Adam over all). ROLE's label estimator gets config.role_lr_mult times the learning rate
  (Cole et al.), and the classifier head the recipe's head_learning_rate_multiplier times it
  (Kim et al.'s 10x for LL-R/Ct/Cp; hml_jax/recipes.py)."""
  if config.get('adaptive_optimizer', 'separate') == 'shared':
    scale_margin_learning_rate = config.learning_rate
  else:
    scale_margin_learning_rate = config.adaptive_learning_rate
  transforms = {'model': optax.adam(config.learning_rate),
                'scale_margin': optax.adam(scale_margin_learning_rate),
                'estimator': optax.adam(config.learning_rate * config.role_lr_mult)}
  head_multiplier = recipes.resolve(config).head_learning_rate_multiplier
  if head_multiplier != 1:
    transforms['head'] = optax.adam(config.learning_rate * head_multiplier)

  def group_of(params):
    groups = {key: key for key in params}
    if 'head' in transforms:  # the backbone's parameters stay in 'model'
      groups['model'] = {name: 'head' if name == 'head' else 'model' for name in params['model']}
    return groups

  return optax.multi_transform(transforms, group_of)


def check_backbone_workdir(directory: str, config) -> None:
  """config.init_from='workdir:DIR': DIR must hold a finished epoch of an hml_jax run of the same
  model and input channels; errors name what differs."""
  spec = f'{pretrained.WORKDIR_PREFIX}{directory}'
  if not files.exists(checkpoints.config_path(directory)):
    raise FileNotFoundError(f'config.init_from={spec!r}: {directory} holds no hml_jax run (no '
                            'config.json). Train the source run there first.')
  source = ml_collections.ConfigDict(files.read_json(checkpoints.config_path(directory)))
  if source.model != config.model:
    raise ValueError(f"config.init_from={spec!r}: that run's backbone is {source.model!r}, but "
                     f'config.model is {config.model!r}.')
  if not files.exists(files.join(directory, 'results.json')):
    raise FileNotFoundError(f'config.init_from={spec!r}: the run in {directory} has not finished '
                            '(no results.json): its best checkpoint may still change. Finish '
                            'that run first (the same command resumes it).')


def backbone_of_workdir(directory: str, model, image_shape):
  """{'params', 'batch_stats'} of the backbone of DIR's best checkpoint, checked against model's
  backbone for inputs of image_shape (H, W, C)."""
  check_backbone_workdir(directory, ml_collections.ConfigDict(
      {'model': files.read_json(checkpoints.config_path(directory))['model']}))
  _, _, state = load_trained_state(directory, 'best')
  loaded = {'params': jax.device_get(state.params['model'].get('backbone', {})),
            'batch_stats': jax.device_get(state.batch_stats.get('backbone', {}))}
  expected = pretrained.expected_variables(model.backbone, (1,) + tuple(image_shape))
  got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), loaded)
  wanted = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
  if got != wanted:
    raise ValueError(f'config.init_from=workdir:{directory}: its backbone does not fit this '
                     f'model for inputs {tuple(image_shape)} (another number of channels or '
                     f'layers): {jax.tree_util.tree_leaves(got)[:3]}... against '
                     f'{jax.tree_util.tree_leaves(wanted)[:3]}...')
  return loaded


def with_pretrained_backbone(variables, model, init_from: str, image_shape):
  """variables with the backbone's parameters and BatchNorm statistics replaced by the weights
  named by config.init_from ('torchvision:resnet50', 'torchvision:/path/file.pth',
  'workdir:DIR'; hml_jax/pretrained.py). The head keeps its fresh initialization (a torchvision
  file's 1000-class fc layer and a source run's head are dropped)."""
  directory = pretrained.workdir_of(init_from)
  if directory is not None:
    loaded = backbone_of_workdir(directory, model, image_shape)
    variables = flax.core.unfreeze(variables)
    variables['params']['backbone'] = jax.tree_util.tree_map(jnp.asarray, loaded['params'])
    variables['batch_stats']['backbone'] = jax.tree_util.tree_map(jnp.asarray,
                                                                  loaded['batch_stats'])
    logging.info('Backbone initialized from the best checkpoint (epoch %d) of %s.',
                 files.read_json(files.join(directory, 'results.json'))['best_epoch'], directory)
    return variables
  loaded = pretrained.init_variables_from(init_from, model.backbone, (1,) + tuple(image_shape))
  variables = flax.core.unfreeze(variables)
  variables['params']['backbone'] = jax.tree_util.tree_map(jnp.asarray, loaded['params'])
  variables['batch_stats']['backbone'] = jax.tree_util.tree_map(jnp.asarray,
                                                                loaded['batch_stats'])
  logging.info('Backbone initialized from %s (%s).', init_from,
               pretrained.weights_file(init_from, progress=False))  # verified once per process
  return variables


def create_train_state(config, model, method, rng, image_shape,
                       observed_labels=None) -> TrainState:
  """observed_labels: the training split's observed labels, needed by methods that update or
  estimate them."""
  variables = model.init(rng, jnp.zeros((1,) + image_shape, jnp.float32), train=False)
  if config.get('init_from'):
    variables = with_pretrained_backbone(variables, model, config.init_from, image_shape)
  params = {'model': variables['params']}
  if method.learns_scale_and_margin:
    params['scale_margin'] = {'scale': jnp.float32(config.scale),
                              'margin': jnp.float32(config.margin)}
  if method.label_estimator:
    if observed_labels is None:
      raise ValueError(f'config.loss={config.loss!r} estimates labels: pass the observed labels.')
    params['estimator'] = losses.role_estimator_init(observed_labels, jax.random.fold_in(rng, 1))
  label_state = None
  if method.labels_in_state:
    if observed_labels is None:
      raise ValueError(f'config.loss={config.loss!r} updates the observed labels: pass them.')
    label_state = jnp.asarray(observed_labels, jnp.float32)
  return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(config),
                           batch_stats=variables.get('batch_stats', {}), observed_labels=label_state)


def train_state_shapes(config, model, method, image_shape, observed_labels=None):
  """jax.eval_shape of create_train_state: the state's structure with a jax.ShapeDtypeStruct
  for every array, computed without creating any of them (and without reading pretrained
  weights: they only replace values of the same shapes)."""
  template_config = ml_collections.ConfigDict(config.to_dict())
  template_config.init_from = ''
  return jax.eval_shape(lambda: create_train_state(template_config, model, method,
                                                   jax.random.key(0), image_shape,
                                                   observed_labels=observed_labels))


def train_state_shardings(config, state_or_shapes, mesh):
  """The NamedSharding of every array of a train state (or of its train_state_shapes) under
  config.parameter_sharding and config.fsdp_min_size (hml_jax/sharding.py)."""
  mode, min_size = parameter_layout(config)
  return sharding.state_shardings(state_or_shapes, mesh, mode, min_size)


def scale_and_margin(params, config, method=None):
  """(s, m) of the margin sigmoid: the learned s*, m* for adaptive HML, else the config's fixed
  pair (or the method's own fixed margin, 0 for the normalized sigmoid)."""
  if 'scale_margin' in params:
    return params['scale_margin']['scale'], params['scale_margin']['margin']
  margin = config.margin
  if method is not None and method.fixed_margin is not None:
    margin = method.fixed_margin
  return jnp.float32(config.scale), jnp.float32(margin)


def loss_hyperparameters(method, config, train_labels) -> Dict[str, Any]:
  """The loss's keyword arguments from the config. expected_num_pos < 0 means: estimate it as the
  mean number of (true) positives per training image, as Cole et al.'s per-dataset values are."""
  values = {name: config[name] for name in method.hyperparameters}
  if values.get('expected_num_pos', 0) < 0:
    values['expected_num_pos'] = float(np.mean(np.sum(train_labels, axis=1)))
  if values:
    logging.info('Loss %s hyperparameters: %s', config.loss, values)
  return values


def normalize_images(images, config):
  """uint8 images -> (x / 255 - mean) / std with config.dataset.mean/std; float inputs (features
  mode) are used as they are."""
  if images.dtype != jnp.uint8:
    return images.astype(jnp.float32)
  mean = jnp.asarray(config.dataset.mean, jnp.float32)
  std = jnp.asarray(config.dataset.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def gradient_pulls(logits, observed_labels):
  """(positive, negative): the BCE gradient magnitudes w.r.t. the logits summed over the batch's
  observed positives, sum (1 - p), and over all other entries, sum p (paper Fig. 3)."""
  probabilities = jax.nn.sigmoid(logits)
  positive = (observed_labels > 0.5).astype(jnp.float32)
  return (jnp.sum(positive * (1.0 - probabilities)),
          jnp.sum((1.0 - positive) * probabilities))


def compute_loss(method, outputs, observed_labels, params, config, hyperparameters,
                 original_labels=None):
  """(loss, parts): the method's loss, and for logging its BCE on the scores it ranks with, the
  accumulated positive and negative gradient (gradient_pulls) and, for cosine heads, the
  gradient-balance term of Eq. 6 at the current s, m. For methods that update the labels,
  parts['modified_labels'] holds the entries to make observed positives."""
  labels_as_observed = observed_labels if original_labels is None else original_labels
  if not method.has_scale_and_margin:
    loss = method.loss(outputs, observed_labels, **hyperparameters)
    parts = {}
    if method.updates_labels:
      loss, parts['modified_labels'] = loss
    # Against the labels as first observed (the label state may hold corrections or soft
    # pseudo-labels), so that the logged BCE means the same for every method.
    parts['bce'] = losses.binary_cross_entropy(outputs, labels_as_observed)
    parts['positive_gradient'], parts['negative_gradient'] = gradient_pulls(
        outputs, labels_as_observed)
    return loss, jax.lax.stop_gradient(parts)
  scale, margin = scale_and_margin(params, config, method)
  loss = method.loss(outputs, observed_labels, scale=scale, margin=margin, **hyperparameters)
  scale, margin = jax.lax.stop_gradient((scale, margin))
  margin_on = hyperparameters.get('margin_on', 'both')
  parts = {'bce': losses.hml_fixed(outputs, observed_labels, scale, margin, margin_on),
           'gradient_balance': losses.adaptive_loss(outputs, observed_labels, scale, margin,
                                                    margin_on)}
  margin_logits = heads.margin_logits(
      outputs, scale, losses.entry_margins(labels_as_observed, margin, margin_on))
  parts['positive_gradient'], parts['negative_gradient'] = gradient_pulls(
      margin_logits, labels_as_observed)
  return loss, jax.lax.stop_gradient(parts)


def scores_from_outputs(method, outputs, params, config):
  """Pre-sigmoid scores used for ranking metrics (logits avoid float32 ties at p = 1).

  A margin on only one group of labels cannot be applied at test time, where labels are unknown;
  then the test score has no margin (paper Sec. 4.5). The ranking is the same either way: the
  margin map is increasing in the cosine.
  """
  if method.has_scale_and_margin:
    scale, margin = scale_and_margin(params, config, method)
    if config.get('margin_on', 'both') != 'both':
      margin = 0.0
    return heads.margin_logits(outputs, scale, margin)
  return outputs


def train_step(state: TrainState, batch, schedule, *, method, config, hyperparameters):
  """One optimizer step. batch: images, labels and indices (rows of the training split);
  schedule: the loss's per-epoch keyword arguments (method.schedule), as arrays."""
  images = normalize_images(batch['images'], config)
  if method.labels_in_state:
    labels = state.observed_labels[batch['indices']]
  else:
    labels = batch['labels']

  def loss_fn(params):
    outputs, updates = state.apply_fn(
        {'params': params['model'], 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'])
    arguments = {**hyperparameters, **schedule}
    if method.label_estimator:
      arguments['estimator_logits'] = params['estimator'][batch['indices']]
    loss, parts = compute_loss(method, outputs, labels, params, config, arguments,
                               original_labels=batch['labels'])
    return loss, (updates, parts)

  (loss, (updates, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  modified = parts.pop('modified_labels') if method.updates_labels else None
  if method.updates_labels:
    parts['labels_modified'] = jnp.sum(modified)

  def apply_step(state):
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
    if method.learns_scale_and_margin:
      scale_margin = dict(new_state.params['scale_margin'])
      scale_margin['margin'] = heads.bound_learned_margin(scale_margin['margin'])
      new_state = new_state.replace(params={**new_state.params, 'scale_margin': scale_margin})
    if method.updates_labels:
      new_state = new_state.replace(observed_labels=new_state.observed_labels.at[
          batch['indices']].max(modified.astype(jnp.float32)))
    return new_state

  # A step with a NaN or Inf loss or gradient changes nothing (so the state stays good); the
  # host stops or counts it (config.nonfinite), naming the first bad quantity.
  # One pass over the gradients gives both: a leaf is finite iff its sum of squares is (NaN and
  # Inf propagate; a sum that overflows float32, elements beyond ~1e19, counts as non-finite
  # too), and the global norm. A separate isfinite pass cost 6% of a ResNet-50 step on CPU.
  squared_norms = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree_util.tree_leaves(grads)])
  finite_gradients = jnp.isfinite(squared_norms)
  is_finite = jnp.isfinite(loss) & jnp.all(finite_gradients)
  # A branch, not a select of new and old values: the select kept both states alive and made
  # ResNet-50's Adam update 2.3x slower on CPU (33.8 vs 14.7 ms; docs/performance_notes.md).
  state = jax.lax.cond(is_finite, apply_step, lambda state: state, state)
  step_metrics = {'loss': loss, 'grad_norm': jnp.sqrt(jnp.sum(squared_norms)), **parts,
                  'nonfinite': 1.0 - is_finite.astype(jnp.float32),
                  # -1: the loss itself; else the first parameter (tree_leaves order) whose
                  # gradient is not finite (only meaningful when 'nonfinite' is 1).
                  'first_nonfinite_gradient': jnp.where(
                      jnp.isfinite(loss), jnp.argmin(finite_gradients), -1)}
  if method.has_scale_and_margin:
    step_metrics['scale'], step_metrics['margin'] = scale_and_margin(state.params, config, method)
  return state, step_metrics


def eval_step(state: TrainState, batch, forward_matrices, *, method, config):
  """{'scores' (batch, labels), 'indices', 'mask'}: the scores of a global batch, returned with
  the rows and padding mask they belong to (every process then sees the whole batch).
  forward_matrices: layers.forward_matrices of the model's parameters, or {} (see EvalFunction)."""
  images = normalize_images(batch['images'], config)
  variables = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  if forward_matrices:
    variables[layers.FORWARD_MATRICES] = forward_matrices
  outputs = state.apply_fn(variables, images, train=False)
  return {'scores': scores_from_outputs(method, outputs, state.params, config),
          'indices': batch['indices'], 'mask': batch['mask']}


class EvalFunction:
  """eval_fn(state, batch): the jitted eval_step. With 'matmul' convolutions (CPU) and replicated
  parameters, the transposed kernels that the forward pass multiplies by
  (layers.forward_matrices) are computed once per parameters, whenever state.params is another
  object than in the last call, instead of in every call: evaluating a split calls this many
  times with one state. The parameters count as the same while every array in them is the same
  object (arrays are immutable, every step returns new ones, and a kernel replaced in a params
  dict is a new array there)."""

  def __init__(self, step, prepare=None):
    self.step, self.prepare = step, prepare
    self._arrays, self._matrices = (), None

  def forward_matrices(self, params):
    if self.prepare is None:
      return {}
    arrays = tuple(jax.tree_util.tree_leaves(params))
    if len(arrays) != len(self._arrays) or any(
        new is not old for new, old in zip(arrays, self._arrays)):
      # Holding the arrays keeps their ids from being reused; a train step donates them, so
      # what is held then is only their (deleted) handles.
      self._matrices, self._arrays = self.prepare(params), arrays
    return self._matrices

  def __call__(self, state, batch):
    return self.step(state, batch, self.forward_matrices(state.params))


def make_step_functions(method, config, mesh, hyperparameters=None, state_shardings=None):
  """(train_fn, eval_fn): the jitted steps, batch split over the mesh's data axis, metrics and
  scores replicated, the state donated to the train step (updated in place). eval_fn is an
  EvalFunction, called as eval_fn(state, batch).

  state_shardings: the state's layout, train_state_shardings(config, state, mesh); None means
  replicated. The state passed to the steps must already be laid out so (jit refuses others),
  and the train step returns it in the same layout.
  """
  if state_shardings is None:
    state_shardings = sharding.replicated(mesh)
  replicated = sharding.replicated(mesh)
  data_sharding = sharding.batch_sharding(mesh)
  train_fn = jax.jit(functools.partial(train_step, method=method, config=config,
                                       hyperparameters=hyperparameters or {}),
                     in_shardings=(state_shardings, data_sharding, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  # Scores come back replicated: small (batch x labels), and every process needs them all.
  step = jax.jit(functools.partial(eval_step, method=method, config=config),
                 in_shardings=(state_shardings, data_sharding, replicated),
                 out_shardings=replicated)
  prepare = None
  if (layers.resolve_convolutions(config.get('convolutions', 'auto')) == 'matmul' and
      parameter_layout(config)[0] == 'replicated'):
    # (With fsdp the parameters are split over the devices; replicated matrices would undo that.)
    prepare = jax.jit(lambda params: layers.forward_matrices(params['model']),
                      in_shardings=replicated, out_shardings=replicated)
  return train_fn, EvalFunction(step, prepare)


def predict(eval_fn, state, split, config, mesh) -> np.ndarray:
  """Scores (num_images, num_labels) of every image of a split, in the split's row order (a
  streamed split may deliver its images in another order)."""
  scores = np.zeros(split.labels.shape, np.float32)
  times_scored = np.zeros(len(split), np.int64)
  for batch in split.eval_batches(config.eval_batch_size):
    result = jax.device_get(eval_fn(state, sharding.shard_batch(batch, mesh)))
    mask = np.asarray(result['mask'])
    rows = np.asarray(result['indices'])[mask]
    scores[rows] = np.asarray(result['scores'])[mask]
    np.add.at(times_scored, rows, 1)
  if np.any(times_scored != 1):
    raise RuntimeError(f'The input pipeline delivered {int(np.sum(times_scored == 0))} of '
                       f'{len(split)} images never and {int(np.sum(times_scored > 1))} more than '
                       'once for evaluation.')
  return scores


def model_outputs(state, config, split, mesh, batch_size, method=None, max_images=None):
  """(outputs, rows): the model's outputs (cosines or logits; with method, e.g. the backbone,
  that submodule's) for the images of split in delivery order, and their rows; at most
  max_images of them. Single process (the outputs stay sharded over this host's devices). state
  must be laid out as config.parameter_sharding says (as load_trained_state returns it)."""

  def forward(state, batch):
    images = normalize_images(batch['images'], config)
    return state.apply_fn({'params': state.params['model'], 'batch_stats': state.batch_stats},
                          images, train=False, method=method)

  step = jax.jit(forward,
                 in_shardings=(train_state_shardings(config, state, mesh),
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))
  outputs, rows, count = [], [], 0
  for batch in split.eval_batches(batch_size):
    mask = batch['mask']
    result = np.asarray(jax.device_get(step(state, sharding.shard_batch(
        {'images': batch['images']}, mesh))))
    outputs.append(result[mask])
    rows.append(batch['indices'][mask])
    count += int(mask.sum())
    if max_images is not None and count >= max_images:
      break
  return np.concatenate(outputs)[:max_images], np.concatenate(rows)[:max_images]


def update_pseudo_labels(eval_fn, state, data, config, epoch, mesh):
  """EM + APL after an epoch: new pseudo-labels from the predictions on the training images."""
  if epoch < config.warmup_epoch or epoch >= config.num_epochs:
    return state
  probabilities = np.asarray(jax.nn.sigmoid(predict(eval_fn, state, data.train, config, mesh)))
  unknown_per_class = np.sum(data.train.observed == 0, axis=0)
  # The label state may be split over the devices (config.parameter_sharding='fsdp'): gathered
  # for the host computation, and put back in the same layout.
  label_state = losses.asymmetric_pseudo_labels(
      sharding.gather_to_host(state.observed_labels, mesh), probabilities, unknown_per_class,
      config.num_epochs, config.warmup_epoch, config.neg_proportion)
  logging.info('Epoch %d: %d pseudo-labels.', epoch, int(np.sum(label_state < 0)))
  return state.replace(observed_labels=sharding.place(label_state.astype(np.float32),
                                                      state.observed_labels.sharding))


def evaluate(eval_fn, state, split, config, mesh) -> Dict[str, Any]:
  scores, labels = predict(eval_fn, state, split, config, mesh), split.labels
  per_class = metrics_lib.average_precision_per_class(scores, labels)
  return {'map': float(np.nanmean(per_class)), 'per_class_ap': per_class}


def _as_percent(value):
  return None if value is None or np.isnan(value) else round(100.0 * float(value), 4)


def write_results(workdir, config, recipe, history, label_names):
  """results.json: the best epoch by validation mAP and its test mAP, plus the last epoch, the
  training recipe, whether it stopped early and the linear-init phase's results if any."""
  best = max(history['epochs'], key=lambda e: e['val_map'])
  last = history['epochs'][-1]
  results = {
      'best_epoch': best['epoch'],
      'val_map': best['val_map'],
      'test_map': best['test_map'],
      'last_test_map': last['test_map'],
      'last_val_map': last['val_map'],
      'per_class_ap': dict(zip(label_names, best['test_per_class_ap'])),
      'final_scale': last['scale'],
      'final_margin': last['margin'],
      'train_images_per_sec': history['train_images'] / max(history['train_seconds'], 1e-9),
      'wall_seconds': history['wall_seconds'],
      'recipe': dataclasses.asdict(recipe),
      'stopped_early': len(history['epochs']) < config.num_epochs,
      'linear_init': history.get('linear_init'),
      'epochs': [{k: v for k, v in e.items() if k != 'test_per_class_ap'}
                 for e in history['epochs']],
      'config': config.to_dict(),
  }
  if jax.process_index() == 0:  # one writer; every process returns the same results
    files.write_json(files.join(workdir, 'results.json'), results, default=list)
  return results


def announce_initialization(config) -> None:
  """Before any other work of a new run: the pretrained weights are found (or downloaded; an
  error names where to put them), or a warning says that a torchvision ResNet starts random."""
  if config.get('init_from') and pretrained.workdir_of(config.init_from) is not None:
    check_backbone_workdir(pretrained.workdir_of(config.init_from), config)
  elif config.get('init_from'):
    pretrained.weights_file(config.init_from)
  elif config.model in pretrained.IMAGENET_WEIGHTS:
    logging.warning(
        'The %s backbone starts from random weights (config.init_from=\'\'). The paper and its '
        'baselines start from ImageNet weights and their numbers assume them: '
        '--config.init_from=torchvision:%s.', config.model, config.model)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: Optional[input_pipeline.Data] = None) -> Dict[str, Any]:
  """Trains config.loss on config.dataset, evaluates every epoch, writes workdir/results.json.

  Running the same command again resumes from the newest checkpoint in workdir.
  """
  validate_config(config)
  files.makedirs(workdir)
  if jax.process_index() > 0:  # process 0 holds the workdir's lock for all of them
    return _train_and_evaluate(config, workdir, data)
  with checkpoints.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, data)


def _train_and_evaluate(config, workdir, data=None):
  start_time = time.time()
  method = losses.get_method(config.loss)
  # APL's pseudo-label counts depend on num_epochs, so it cannot change when resuming.
  checkpoints.check_config(workdir, config, checkpoints.RESUMABLE_KEYS - (
      {'num_epochs'} if method.pseudo_labels else set()))
  starts_afresh = not checkpoints.has_checkpoint(workdir)
  if starts_afresh:
    announce_initialization(config)
  recipe = recipes.resolve(config)
  if recipe != recipes.Recipe():
    logging.info('Training recipe of %s (config.recipe=%s): %s.', config.loss, config.recipe,
                 recipe.describe())
  if data is None:
    data = input_pipeline.load(config)

  mesh = sharding.create_mesh()
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  model = models.create_model(config.model, method.head, len(data.label_names), dtype=dtype,
                              convolutions=config.convolutions)
  # The layout of the state (config.parameter_sharding) is known before the state exists: a
  # resumed run restores straight into it, without initializing (or gathering) anything first.
  state_shapes = train_state_shapes(config, model, method, data.train.example_shape,
                                    observed_labels=data.train.observed)

  history = {'epochs': [], 'train_images': 0, 'train_seconds': 0.0, 'wall_seconds': 0.0}
  manager = checkpoints.Checkpointer(workdir, keep=config.checkpoints_to_keep)
  restored = manager.restore_latest(sharding.abstract_arrays(
      state_shapes, train_state_shardings(config, state_shapes, mesh)))
  partial = None
  data_fingerprint = input_pipeline.fingerprint(data)
  if restored is None:
    state = create_train_state(config, model, method, jax.random.key(config.seed),
                               data.train.example_shape, observed_labels=data.train.observed)
    state = sharding.place(state, train_state_shardings(config, state, mesh))
  if restored is None and jax.process_index() == 0:
    checkpoints.write_config(workdir, config)
    checkpoints.write_dataset_info(workdir, data.label_names, data.train.example_shape,
                                   len(data.train), data_fingerprint)
  elif restored is not None:
    checkpoints.check_dataset(workdir, data_fingerprint)
    state, history = restored
    partial = history.pop('partial', None)
    logging.info('Resumed from epoch %d%s in %s.', len(history['epochs']),
                 f" and {len(partial['step_metrics'])} steps of epoch {partial['epoch']}"
                 if partial else '', workdir)
  if restored is None and recipe.linear_init_epochs > 0:
    from hml_jax import linear_init  # pylint: disable=g-import-not-at-top
    state, history['linear_init'] = linear_init.train_head(config, recipe, workdir, data, state,
                                                           mesh)
  first_epoch = len(history['epochs']) + 1
  if first_epoch > config.num_epochs or stops_early(recipe, history):
    logging.info('All %d epochs are done in %s; rewriting results.json only.',
                 len(history['epochs']), workdir)
    return write_results(workdir, config, recipe, history, data.label_names)

  hyperparameters = loss_hyperparameters(method, config, data.train.labels)
  # From the state itself: a pytree of shardings must match the state's tree, whose static part
  # (the optimizer's functions) differs between two create_train_state calls.
  train_fn, eval_fn = make_step_functions(method, config, mesh, hyperparameters,
                                          train_state_shardings(config, state, mesh))

  steps_per_epoch = input_pipeline.num_train_steps_per_epoch(data.train, config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'The training split has {len(data.train)} images, fewer than '
                     f'config.batch_size={config.batch_size}.')
  # Imported here, not at the top: clu's writers import TensorFlow, which the step functions
  # (benchmark, predict, a GPU machine without TensorFlow) do not need.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if restored is None and jax.process_index() == 0:
    writer.write_hparams({k: v for k, v in checkpoints.flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=steps_per_epoch * config.num_epochs, writer=writer)

  def save_partial(state, step_metrics, step):
    manager.save_preempted(step, state, {**history, 'partial': {
        'epoch': epoch, 'step_metrics': step_metrics}})

  with preemption.Guard() as guard:
    for epoch in range(first_epoch, config.num_epochs + 1):
      state, history = _train_and_evaluate_epoch(
          epoch, state, history, manager, train_fn, eval_fn, method, data, config, mesh, writer,
          report_progress, guard, partial if epoch == first_epoch else None, save_partial,
          steps_per_epoch)
      history['wall_seconds'] += time.time() - start_time
      start_time = time.time()
      if stops_early(recipe, history):
        logging.info('Early stopping after epoch %d of %d (%s); the best epoch is kept.', epoch,
                     config.num_epochs, recipe.describe())
        break
  writer.flush()
  manager.wait()
  return write_results(workdir, config, recipe, history, data.label_names)


def stops_early(recipe, history) -> bool:
  return recipes.should_stop(recipe, [epoch['val_map'] for epoch in history['epochs']])


def _train_and_evaluate_epoch(epoch, state, history, manager, train_fn, eval_fn, method, data,
                              config, mesh, writer, report_progress, guard, partial, save_partial,
                              steps_per_epoch):
  """One epoch: train, (pseudo-labels,) evaluate, record, checkpoint. Returns (state, history)."""
  state, train_summary = train_one_epoch(train_fn, method, state, data.train, config, epoch,
                                         mesh, writer, report_progress, guard, partial,
                                         save_partial)
  history['train_seconds'] += train_summary.pop('seconds')
  history['train_images'] += train_summary.pop('images')
  if method.pseudo_labels:
    state = update_pseudo_labels(eval_fn, state, data, config, epoch, mesh)
  validation = evaluate(eval_fn, state, data.validation, config, mesh)
  test = evaluate(eval_fn, state, data.test, config, mesh)
  # s and m of the margin sigmoid (learned s*, m* for 'hml'); a linear head has none. Scalars,
  # so replicated and readable on every process (the other parameters may be split over
  # processes' devices, which jax.device_get of all of them would refuse).
  scale, margin = ((float(x) for x in scale_and_margin(state.params, config, method))
                   if method.has_scale_and_margin else (None, None))
  record = {'epoch': epoch, 'step': epoch * steps_per_epoch,
            'train_loss': train_summary['loss'], 'train_bce': train_summary['bce'],
            # Summed over the epoch's steps: paper Fig. 3's accumulated gradients.
            'positive_gradient': train_summary['positive_gradient'] * steps_per_epoch,
            'negative_gradient': train_summary['negative_gradient'] * steps_per_epoch,
            'val_map': _as_percent(validation['map']), 'test_map': _as_percent(test['map']),
            'scale': scale, 'margin': margin,
            'skipped_steps': train_summary['skipped_steps'],
            'test_per_class_ap': [_as_percent(v) for v in test['per_class_ap']]}
  writer.write_scalars(record['step'], {
      'val_map': record['val_map'], 'test_map': record['test_map'], 'epoch': epoch,
      'train_loss_epoch': record['train_loss']})
  logging.info('Epoch %d: train loss %.4f, val mAP %.2f, test mAP %.2f%s.', epoch,
               record['train_loss'], record['val_map'], record['test_map'],
               f', s {scale:.3f}, m {margin:.4f}' if scale is not None else '')
  # Strictly better, so that a tie keeps the earlier epoch (as max() in write_results does).
  is_best = all(record['val_map'] > e['val_map'] for e in history['epochs'])
  history['epochs'].append(record)
  manager.save(epoch, state, history, is_best=is_best)
  return state, history


def parameter_names(params):
  """'model/backbone/conv1/kernel', ... in tree_leaves order (that of the gradients)."""
  return ['/'.join(str(getattr(key, 'key', key)) for key in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check_finite(fetched, config, names):
  """fetched: [(step, host metrics)]. With config.nonfinite = 'stop', the first step whose loss
  or gradient was NaN or Inf (the train step left the state unchanged) stops training."""
  for step, metrics in fetched:
    if metrics['nonfinite'] and config.nonfinite == 'stop':
      leaf = int(metrics['first_nonfinite_gradient'])
      quantity = 'the loss' if leaf < 0 else f'the gradient of {names[leaf]}'
      raise FloatingPointError(
          f'Step {step}: {quantity} is NaN or Inf. The step was not applied and no checkpoint '
          'was written after the last finished epoch, which the same command resumes from. '
          'Lower config.learning_rate, or set config.nonfinite=skip to skip such steps (they '
          'are counted as skipped_steps).')


def train_one_epoch(train_fn, method, state, split, config, epoch, mesh, writer, report_progress,
                    guard=None, partial=None, save_partial=None):
  """Runs one epoch of train steps; returns (state, summary of the epoch's mean metrics, plus
  'seconds' and 'images' trained after the first step, which may include compilation, and
  'skipped_steps').

  partial: {'step_metrics': [...]} of the steps of this epoch done before a preemption: they are
  skipped (the data order is a function of (seed, epoch)) and count in the summary. When guard
  says stop, save_partial(state, step_metrics, step) writes a checkpoint and Preempted is raised.
  """
  steps_per_epoch = input_pipeline.num_train_steps_per_epoch(split, config.batch_size)
  schedule = {}
  if method.schedule is not None:
    schedule = method.schedule(epoch, config.batch_size * split.labels.shape[1], config)
    logging.info('Epoch %d loss schedule: %s', epoch, schedule)
  schedule = {key: jnp.asarray(value) for key, value in schedule.items()}
  names = parameter_names(state.params)
  done = list(partial['step_metrics']) if partial else []
  pending, timer_start, timed_images = [], None, 0

  def fetch():
    fetched = jax.device_get(pending)
    pending.clear()
    fetched = [(step, {key: float(value) for key, value in metrics.items()})
               for step, metrics in fetched]
    check_finite(fetched, config, names)
    done.extend(metrics for _, metrics in fetched)
    return fetched

  batches = split.train_batches(config.batch_size, config.seed, epoch, config,
                                start_step=len(done))
  for index, batch in enumerate(batches, start=len(done)):
    step = (epoch - 1) * steps_per_epoch + index + 1
    state, metrics = train_fn(state, sharding.shard_batch(batch, mesh), schedule)
    pending.append((step, metrics))
    if timer_start is None:
      jax.block_until_ready(metrics)
      timer_start = time.time()
    else:
      timed_images += config.batch_size
    report_progress(step, time.time())
    if step % config.log_every_steps == 0:
      writer.write_scalars(step, fetch()[-1][1])  # also bounds the queued steps
    if guard is not None and guard.should_stop(step):
      fetch()
      save_partial(state, done, step)
      raise preemption.Preempted(step, guard.signal_name)
  fetch()
  summary = {key: float(np.mean([m[key] for m in done])) for key in done[0]
             if key != 'first_nonfinite_gradient'}
  summary['skipped_steps'] = int(sum(m['nonfinite'] for m in done))
  summary.update(seconds=time.time() - (timer_start or time.time()), images=timed_images)
  return state, summary


def load_trained_state(workdir: str, which: str = 'best', mesh=None):
  """(config, method, state) of a finished or running workdir; which = 'best' or 'latest'.

  The state is restored straight onto mesh (default: every device) in the layout of the run's
  config.parameter_sharding, ready for make_step_functions(..., train_state_shardings(config,
  state, mesh)) and model_outputs.
  """
  config = ml_collections.ConfigDict(files.read_json(checkpoints.config_path(workdir)))
  method = losses.get_method(config.loss)
  info = checkpoints.read_dataset_info(workdir)
  num_labels = len(info['label_names'])
  model = models.create_model(config.model, method.head, num_labels,
                              convolutions=config.get('convolutions', 'auto'))
  # The template only gives shapes and layout: the checkpoint replaces every value, so
  # pretrained weights (which may have moved since) are not read.
  mesh = mesh or sharding.create_mesh()
  shapes = train_state_shapes(config, model, method, tuple(info['example_shape']),
                              observed_labels=np.zeros((info['num_train'], num_labels),
                                                       np.float32))
  template = sharding.abstract_arrays(shapes, train_state_shardings(config, shapes, mesh))
  manager = checkpoints.Checkpointer(workdir, keep=config.checkpoints_to_keep)
  restored = (manager.restore_best(template) if which == 'best'
              else manager.restore_latest(template))
  if restored is None:
    raise FileNotFoundError(f'No {which} checkpoint in {workdir}.')
  return config, method, restored[0]
