"""The jitted steps and what is computed from a model's outputs: the loss and its logged parts
(compute_loss), scores for ranking (scores_from_outputs), the train and eval steps over the
device mesh (make_step_functions), and the predictions and mAP of a split."""
import dataclasses
import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hml_jax.evaluation import metrics as metrics_lib
from hml_jax.methods import losses
from hml_jax.models import heads
from hml_jax.models import layers
from hml_jax.state import sharding
from hml_jax.state import settings as settings_lib


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The config's values that the steps compute with (from_config): the state's (s, m and the
  layout), the images' normalization (config.dataset.mean, std), where the margin applies
  (config.margin_on) and the convolutions' implementation (config.convolutions). Frozen and
  hashable: the jitted steps close over it."""
  state: settings_lib.StateSettings
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  margin_on: str
  convolutions: str

  @classmethod
  def from_config(cls, config) -> 'StepSettings':
    """The settings of a run's config (the one place this module reads a ConfigDict)."""
    return cls(state=settings_lib.StateSettings.from_config(config),
               mean=tuple(config.dataset.mean),
               std=tuple(config.dataset.std),
               margin_on=config.margin_on,
               convolutions=config.convolutions)


def normalize_images(images, mean, std):
  """uint8 images -> (x / 255 - mean) / std (config.dataset's mean and std); float inputs
  (features mode) are used as they are."""
  if images.dtype != jnp.uint8:
    return images.astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def gradient_pulls(logits, observed_labels):
  """(positive, negative): the BCE gradient magnitudes w.r.t. the logits summed over the batch's
  observed positives, sum (1 - p), and over all other entries, sum p (paper Fig. 3)."""
  probabilities = jax.nn.sigmoid(logits)
  positive = (observed_labels > 0.5).astype(jnp.float32)
  return (jnp.sum(positive * (1.0 - probabilities)), jnp.sum((1.0 - positive) * probabilities))


def compute_loss(method,
                 outputs,
                 observed_labels,
                 params,
                 settings: StepSettings,
                 hyperparameters,
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
  scale, margin = settings_lib.scale_and_margin(params, settings.state, method)
  loss = method.loss(outputs, observed_labels, scale=scale, margin=margin, **hyperparameters)
  scale, margin = jax.lax.stop_gradient((scale, margin))
  margin_on = hyperparameters.get('margin_on', 'both')
  parts = {
      'bce': losses.hml_fixed(outputs, observed_labels, scale, margin, margin_on),
      'gradient_balance': losses.adaptive_loss(outputs, observed_labels, scale, margin, margin_on)
  }
  margin_logits = heads.margin_logits(outputs, scale,
                                      losses.entry_margins(labels_as_observed, margin, margin_on))
  parts['positive_gradient'], parts['negative_gradient'] = gradient_pulls(
      margin_logits, labels_as_observed)
  return loss, jax.lax.stop_gradient(parts)


def scores_from_outputs(method, outputs, params, settings: StepSettings):
  """Pre-sigmoid scores used for ranking metrics (logits avoid float32 ties at p = 1).

  A margin on only one group of labels cannot be applied at test time, where labels are unknown;
  then the test score has no margin (paper Sec. 4.5). The ranking is the same either way: the
  margin map is increasing in the cosine.
  """
  if method.has_scale_and_margin:
    scale, margin = settings_lib.scale_and_margin(params, settings.state, method)
    if settings.margin_on != 'both':
      margin = 0.0
    return heads.margin_logits(outputs, scale, margin)
  return outputs


# The key of train_step's schedule that scales the epoch's learning rate (not a loss argument).
LEARNING_RATE_FACTOR = 'learning_rate_factor'


def learning_rate_factor(epoch: int, decay_epochs, decay_factor: float) -> float:
  """The step schedule: decay_factor ** (how many of decay_epochs are before this 1-based epoch),
  so decay_epochs=(25,) trains epochs 1-25 at the learning rate and 26 on at a tenth of it."""
  return float(decay_factor**sum(epoch > decay_epoch for decay_epoch in decay_epochs))


def scale_step(old, new, factor):
  """old + factor * (new - old) on every leaf: Adam's step is linear in its learning rate, so
  this is the step of an Adam at factor times the rate (its moments are the same)."""
  return jax.tree_util.tree_map(lambda a, b: a + factor * (b - a), old, new)


def train_step(state: settings_lib.TrainState, batch, schedule, *, method, settings: StepSettings,
               hyperparameters):
  """One optimizer step. batch: images, labels and indices (rows of the training split);
  schedule: the loss's per-epoch keyword arguments (method.schedule), as arrays, and with
  config.learning_rate_decay_epochs LEARNING_RATE_FACTOR, the epoch's factor on the network's
  learning rate (learning_rate_factor)."""
  schedule = dict(schedule)
  rate_factor = schedule.pop(LEARNING_RATE_FACTOR, None)
  images = normalize_images(batch['images'], settings.mean, settings.std)
  if method.labels_in_state:
    labels = state.observed_labels[batch['indices']]
  else:
    labels = batch['labels']

  def loss_fn(params):
    outputs, updates = state.apply_fn({
        'params': params['model'],
        'batch_stats': state.batch_stats
    },
                                      images,
                                      train=True,
                                      mutable=['batch_stats'])
    arguments = {**hyperparameters, **schedule}
    if method.label_estimator:
      arguments['estimator_logits'] = params['estimator'][batch['indices']]
    loss, parts = compute_loss(method,
                               outputs,
                               labels,
                               params,
                               settings,
                               arguments,
                               original_labels=batch['labels'])
    return loss, (updates, parts)

  (loss, (updates, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  modified = parts.pop('modified_labels') if method.updates_labels else None
  if method.updates_labels:
    parts['labels_modified'] = jnp.sum(modified)

  def apply_step(state):
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get('batch_stats', {}))
    if rate_factor is not None:  # the network's parameters (head included); not s*, m*
      new_state = new_state.replace(
          params={
              **new_state.params, 'model':
                  scale_step(state.params['model'], new_state.params['model'], rate_factor)
          })
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
  squared_norms = jnp.stack(
      [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)])
  finite_gradients = jnp.isfinite(squared_norms)
  is_finite = jnp.isfinite(loss) & jnp.all(finite_gradients)
  # A branch, not a select of new and old values: the select kept both states alive and made
  # ResNet-50's Adam update 2.3x slower on CPU (33.8 vs 14.7 ms; docs/history.md).
  state = jax.lax.cond(is_finite, apply_step, lambda state: state, state)
  step_metrics = {
      'loss': loss,
      'grad_norm': jnp.sqrt(jnp.sum(squared_norms)),
      **parts,
      'nonfinite': 1.0 - is_finite.astype(jnp.float32),
      # -1: the loss itself; else the first parameter (tree_leaves order) whose
      # gradient is not finite (only meaningful when 'nonfinite' is 1).
      'first_nonfinite_gradient': jnp.where(jnp.isfinite(loss), jnp.argmin(finite_gradients), -1)
  }
  if method.has_scale_and_margin:
    step_metrics['scale'], step_metrics['margin'] = settings_lib.scale_and_margin(
        state.params, settings.state, method)
  return state, step_metrics


def eval_step(state: settings_lib.TrainState, batch, forward_matrices, *, method,
              settings: StepSettings):
  """{'scores' (batch, labels), 'indices', 'mask'}: the scores of a global batch, returned with
  the rows and padding mask they belong to (every process then sees the whole batch).
  forward_matrices: layers.forward_matrices of the model's parameters, or {} (see EvalFunction)."""
  images = normalize_images(batch['images'], settings.mean, settings.std)
  variables = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  if forward_matrices:
    variables[layers.FORWARD_MATRICES] = forward_matrices
  outputs = state.apply_fn(variables, images, train=False)
  return {
      'scores': scores_from_outputs(method, outputs, state.params, settings),
      'indices': batch['indices'],
      'mask': batch['mask']
  }


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


def make_step_functions(method,
                        settings: StepSettings,
                        mesh,
                        hyperparameters=None,
                        state_shardings=None):
  """(train_fn, eval_fn): the jitted steps, batch split over the mesh's data axis, metrics and
  scores replicated, the state donated to the train step (updated in place). eval_fn is an
  EvalFunction, called as eval_fn(state, batch).

  state_shardings: the state's layout, settings_lib.train_state_shardings(settings.state, state,
  mesh);
  None means replicated. The state passed to the steps must already be laid out so (jit refuses others),
  and the train step returns it in the same layout.
  """
  if state_shardings is None:
    state_shardings = sharding.replicated(mesh)
  replicated = sharding.replicated(mesh)
  data_sharding = sharding.batch_sharding(mesh)
  train_fn = jax.jit(functools.partial(train_step,
                                       method=method,
                                       settings=settings,
                                       hyperparameters=hyperparameters or {}),
                     in_shardings=(state_shardings, data_sharding, replicated),
                     out_shardings=(state_shardings, replicated),
                     donate_argnums=(0,))
  # Scores come back replicated: small (batch x labels), and every process needs them all.
  step = jax.jit(functools.partial(eval_step, method=method, settings=settings),
                 in_shardings=(state_shardings, data_sharding, replicated),
                 out_shardings=replicated)
  prepare = None
  if (layers.resolve_convolutions(settings.convolutions) == 'matmul' and
      settings.state.parameter_sharding == 'replicated'):
    # (With fsdp the parameters are split over the devices; replicated matrices would undo that.)
    prepare = jax.jit(lambda params: layers.forward_matrices(params['model']),
                      in_shardings=replicated,
                      out_shardings=replicated)
  return train_fn, EvalFunction(step, prepare)


def predict(eval_fn, state, split, batch_size: int, mesh) -> np.ndarray:
  """Scores (num_images, num_labels) of every image of a split, in the split's row order (a
  streamed split may deliver its images in another order), in batches of batch_size
  (config.eval_batch_size)."""
  scores = np.zeros(split.labels.shape, np.float32)
  times_scored = np.zeros(len(split), np.int64)
  for batch in split.eval_batches(batch_size):
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


def model_outputs(state,
                  settings: StepSettings,
                  split,
                  mesh,
                  batch_size,
                  method=None,
                  max_images=None):
  """(outputs, rows): the model's outputs (cosines or logits; with method, e.g. the backbone,
  that submodule's) for the images of split in delivery order, and their rows; at most
  max_images of them. Single process (the outputs stay sharded over this host's devices). state
  must be laid out as settings.state says (as load_trained_state returns it)."""

  def forward(state, batch):
    images = normalize_images(batch['images'], settings.mean, settings.std)
    return state.apply_fn({
        'params': state.params['model'],
        'batch_stats': state.batch_stats
    },
                          images,
                          train=False,
                          method=method)

  step = jax.jit(forward,
                 in_shardings=(settings_lib.train_state_shardings(settings.state, state, mesh),
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))
  outputs, rows, count = [], [], 0
  for batch in split.eval_batches(batch_size):
    mask = batch['mask']
    result = np.asarray(
        jax.device_get(step(state, sharding.shard_batch({'images': batch['images']}, mesh))))
    outputs.append(result[mask])
    rows.append(batch['indices'][mask])
    count += int(mask.sum())
    if max_images is not None and count >= max_images:
      break
  return np.concatenate(outputs)[:max_images], np.concatenate(rows)[:max_images]


def evaluate(eval_fn, state, split, batch_size: int, mesh) -> Dict[str, Any]:
  """{'map', 'per_class_ap'} of a split's scores (predict)."""
  scores, labels = predict(eval_fn, state, split, batch_size, mesh), split.labels
  per_class = metrics_lib.average_precision_per_class(scores, labels)
  return {'map': float(np.nanmean(per_class)), 'per_class_ap': per_class}
