"""A run's config checked before any work is done: every unknown name or impossible value is one
clear error naming the key, its value and the choices."""
import jax
import ml_collections

from hml_jax import init_from
from hml_jax import methods
from hml_jax import models
from hml_jax.data import labels as labels_lib
from hml_jax.datasets import registry
from hml_jax.methods import losses
from hml_jax.methods import recipes
from hml_jax.models import heads
from hml_jax.models import layers
from hml_jax.runtime import errors
from hml_jax.state import sharding
from hml_jax.state import train_state


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Reject unknown names before any work is done, naming the key and the choices."""
  methods.get_method(config.loss)
  models.get_backbone(config.model)
  layers.resolve_convolutions(config.convolutions)
  if config.label_scenario not in labels_lib.SCENARIOS:
    raise errors.InvalidInputError(
        f'Unknown label scenario {config.label_scenario!r} (config.label_scenario); '
        f'choose one of {list(labels_lib.SCENARIOS)}.')
  labels_lib.check_fraction(config.label_scenario, config.positive_fraction)
  if config.optimizer != 'adam':
    raise errors.InvalidInputError(
        f"Unknown optimizer {config.optimizer!r} (config.optimizer); only 'adam' "
        '(the paper\'s) is implemented.')
  num_devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] <= 0 or config[key] % num_devices:
      raise errors.InvalidInputError(
          f'config.{key}={config[key]} must be a positive multiple of the '
          f'{num_devices} devices it is split over.')
  if config.nonfinite not in ('stop', 'skip'):
    raise errors.InvalidInputError(
        f"config.nonfinite must be 'stop' or 'skip', got {config.nonfinite!r}.")
  if config.num_epochs <= 0:
    raise errors.InvalidInputError(f'config.num_epochs must be positive, got {config.num_epochs}.')
  if config.false_negative_images and jax.process_count() > 1:
    raise errors.InvalidInputError(
        'config.false_negative_images is measured on one process only; set it to 0.')
  if (methods.get_method(config.loss).has_scale_and_margin and
      abs(config.margin) > heads.MONOTONIC_MARGIN_LIMIT):
    raise errors.InvalidInputError(
        f'config.margin={config.margin}: beyond |m| = '
        f'{heads.MONOTONIC_MARGIN_LIMIT:.4f} rad the margin sigmoid is no longer '
        'increasing in the cosine (heads.cos_with_margin); the paper uses 0-0.4.')
  if config.adaptive_optimizer not in train_state.ADAPTIVE_OPTIMIZERS:
    raise errors.InvalidInputError(
        f'Unknown config.adaptive_optimizer={config.adaptive_optimizer!r}; choose '
        f'one of {list(train_state.ADAPTIVE_OPTIMIZERS)}.')
  if config.adaptive_scale not in losses.ADAPTIVE_SCALES:
    raise errors.InvalidInputError(
        f'Unknown config.adaptive_scale={config.adaptive_scale!r}; choose '
        f'one of {list(losses.ADAPTIVE_SCALES)}.')
  if not config.logit_spread > 0:
    raise errors.InvalidInputError(
        f'config.logit_spread={config.logit_spread} must be positive: it is the standard '
        'deviation of the margin logits that s* is set to give (1.1 by default).')
  if config.init_from:
    init_from.check(config.init_from, config.model)
  recipes.from_config(config)
  registry.check_inputs(config.dataset)
  sharding.check_parameter_sharding(config.parameter_sharding, config.fsdp_min_size)
