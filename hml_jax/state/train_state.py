"""How a train state is made: its parameters and optimizer (create_optimizer, create_train_state),
its shapes before it exists (train_state_shapes), and the trained state of a workdir
(load_trained_state), which predict, evaluate, analyze, extract_features, benchmark and the
'workdir:' source of init_from.py read. A pretrained backbone comes in loaded (init_from.py)."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hml_jax import methods
from hml_jax import models
from hml_jax.methods import losses
from hml_jax.runtime import errors
from hml_jax.runtime import files
from hml_jax.state import checkpoints
from hml_jax.state import sharding
from hml_jax.state import workdir_files
# The state's type and settings (settings.py), by the names the callers use.
from hml_jax.state.settings import scale_and_margin, StateSettings, TrainState  # noqa: F401
from hml_jax.state.settings import train_state_shardings  # noqa: F401

ADAPTIVE_OPTIMIZERS = ('log', 'separate', 'shared')


def log_scale_adam(learning_rate: float) -> optax.GradientTransformation:
  """Adam on the 'scale_margin' group {'scale': s, 'margin': m} with s stepped in log space: Adam
  sees the gradient in log s, s * dL/ds, and its step u applies as s <- s * exp(u). So s moves by
  about a factor exp(learning_rate) per step whatever its size (a start 8x off is corrected in
  about 200 steps at 1e-2) and stays positive; m is plain Adam."""
  adam = optax.adam(learning_rate)

  def with_scale(tree, function):
    # Inside multi_transform the tree is the whole params, the other groups masked.
    group = tree['scale_margin']
    return {**tree, 'scale_margin': {**group, 'scale': function(group['scale'])}}

  def update(updates, state, params):
    if 'scale_margin' not in params:  # a method without s*, m*: the group is empty
      return adam.update(updates, state, params)
    scale = params['scale_margin']['scale']
    steps, state = adam.update(with_scale(updates, lambda g: g * scale), state, params)
    return with_scale(steps, lambda u: scale * jnp.expm1(u)), state

  return optax.GradientTransformation(adam.init, update)


def create_optimizer(settings: StateSettings) -> optax.GradientTransformation:
  """Adam over everything. s* and m* (adaptive HML) get their own Adam at
  settings.adaptive_learning_rate with s* in log space (adaptive_optimizer='log', the
  default; log_scale_adam), their own plain Adam ('separate'), or the network's Adam and learning
  rate ('shared', the paper's literal reading: learnable parameters like the rest; Adam is
  elementwise, so this is one Adam over all). ROLE's label estimator gets role_lr_mult times the
  learning rate
  (Cole et al.), and the classifier head the recipe's head_learning_rate_multiplier times it
  (Kim et al.'s 10x for LL-R/Ct/Cp; hml_jax/methods/recipes.py)."""
  adaptive_optimizer = settings.adaptive_optimizer
  if adaptive_optimizer == 'shared':
    scale_margin_learning_rate = settings.learning_rate
  else:
    scale_margin_learning_rate = settings.adaptive_learning_rate
  if adaptive_optimizer == 'log':
    scale_margin = log_scale_adam(scale_margin_learning_rate)
  else:
    scale_margin = optax.adam(scale_margin_learning_rate)
  transforms = {
      'model': optax.adam(settings.learning_rate),
      'scale_margin': scale_margin,
      'estimator': optax.adam(settings.learning_rate * settings.role_lr_mult)
  }
  head_multiplier = settings.head_learning_rate_multiplier
  if head_multiplier != 1:
    transforms['head'] = optax.adam(settings.learning_rate * head_multiplier)

  def group_of(params):
    groups = {key: key for key in params}
    if 'head' in transforms:  # the backbone's parameters stay in 'model'
      groups['model'] = {name: 'head' if name == 'head' else 'model' for name in params['model']}
    return groups

  return optax.multi_transform(transforms, group_of)


def backbone_of_workdir(directory: str):
  """{'params', 'batch_stats'} of the backbone of DIR's best checkpoint (init_from.load checks that
  the run is finished and that they fit)."""
  _, _, state = load_trained_state(directory, 'best')
  return {
      'params': jax.device_get(state.params['model'].get('backbone', {})),
      'batch_stats': jax.device_get(state.batch_stats.get('backbone', {}))
  }


def _replace_backbone(variables, loaded):
  variables = flax.core.unfreeze(variables)
  variables['params']['backbone'] = jax.tree_util.tree_map(jnp.asarray, loaded['params'])
  variables['batch_stats']['backbone'] = jax.tree_util.tree_map(jnp.asarray, loaded['batch_stats'])
  return variables


def initial_variables(model, rng, image_shape):
  """model.init on one zero image of image_shape, compiled as one program: run eagerly, every
  operation of the forward pass compiles on its own (resnet_small at 32x32: 12.6 s against
  3.4 s on 2 cores). The values are bitwise the eager ones (hml_jax/models/initializers.py)."""
  return jax.jit(functools.partial(model.init, train=False))(rng,
                                                             jnp.zeros((1,) + tuple(image_shape),
                                                                       jnp.float32))


def create_train_state(settings: StateSettings,
                       model,
                       method,
                       rng,
                       image_shape,
                       observed_labels=None,
                       backbone=None) -> TrainState:
  """observed_labels: the training split's observed labels, needed by methods that update or
  estimate them. backbone: {'params', 'batch_stats'} that replace the backbone's fresh ones
  (init_from.load); the head keeps its fresh initialization."""
  variables = initial_variables(model, rng, image_shape)
  if backbone is not None:
    variables = _replace_backbone(variables, backbone)
  params = {'model': variables['params']}
  if method.learns_scale_and_margin:
    params['scale_margin'] = {
        'scale': jnp.float32(settings.scale),
        'margin': jnp.float32(settings.margin)
    }
  if method.label_estimator:
    if observed_labels is None:
      raise ValueError('This method estimates labels (ROLE): pass the observed labels.')
    params['estimator'] = losses.role_estimator_init(observed_labels, jax.random.fold_in(rng, 1))
  label_state = None
  if method.labels_in_state:
    if observed_labels is None:
      raise ValueError('This method updates the observed labels: pass them.')
    label_state = jnp.asarray(observed_labels, jnp.float32)
  return TrainState.create(apply_fn=model.apply,
                           params=params,
                           tx=create_optimizer(settings),
                           batch_stats=variables.get('batch_stats', {}),
                           observed_labels=label_state)


def train_state_shapes(settings: StateSettings, model, method, image_shape, observed_labels=None):
  """jax.eval_shape of create_train_state: the state's structure with a jax.ShapeDtypeStruct
  for every array, computed without creating any of them (pretrained weights only replace
  values of the same shapes)."""
  return jax.eval_shape(lambda: create_train_state(
      settings, model, method, jax.random.key(0), image_shape, observed_labels=observed_labels))


def load_trained_state(workdir: str, which: str = 'best', mesh=None):
  """(config, method, state) of a finished or running workdir; which = 'best' or 'latest'.

  The state is restored straight onto mesh (default: every device) in the layout of the run's
  config.parameter_sharding, ready for make_step_functions(..., train_state_shardings(
  StateSettings.from_config(config), state, mesh)) and model_outputs.
  """
  if not files.exists(workdir_files.config_path(workdir)):
    raise errors.MissingInputError(
        f'{workdir} holds no hml_jax run (no config.json): give the --workdir of a run trained by '
        '`python -m hml_jax.main --config=... --workdir=...`.')
  config = workdir_files.read_config(workdir)
  method = methods.get_method(config.loss)
  info = workdir_files.read_dataset_info(workdir)
  num_labels = len(info['label_names'])
  model = models.create_model(config.model,
                              method.head,
                              num_labels,
                              convolutions=config.convolutions)
  # The template only gives shapes and layout: the checkpoint replaces every value, so
  # pretrained weights (which may have moved since) are not read.
  mesh = mesh or sharding.create_mesh()
  settings = StateSettings.from_config(config)
  shapes = train_state_shapes(settings,
                              model,
                              method,
                              tuple(info['example_shape']),
                              observed_labels=np.zeros((info['num_train'], num_labels), np.float32))
  template = sharding.abstract_arrays(shapes, train_state_shardings(settings, shapes, mesh))
  manager = checkpoints.Checkpointer(workdir, keep=config.checkpoints_to_keep)
  restored = (manager.restore_best(template)
              if which == 'best' else manager.restore_latest(template))
  if restored is None:
    raise errors.MissingInputError(
        f'No {which} checkpoint in {workdir}: the run has not finished an epoch yet'
        f"{'' if which == 'latest' else ' (--checkpoint=latest reads the newest one)'}.")
  return config, method, restored[0]
