"""What a train state is, apart from how one is made (train_state.py): its type (TrainState), the
config's values it is made of (StateSettings), its layout over the devices
(train_state_shardings) and its s, m (scale_and_margin). The jitted steps (steps.py) need only
these, so they import nothing that creates a state or reads weights."""
import dataclasses
from typing import Any

from flax.training import train_state as flax_train_state
import jax.numpy as jnp

from hml_jax.methods import recipes
from hml_jax.state import sharding


class TrainState(flax_train_state.TrainState):
  batch_stats: Any = None
  # (num_train_images, num_labels) float32, only for methods that change the observed labels
  # (LL-Cp, EM + APL): they live here so that they are checkpointed with the model.
  observed_labels: Any = None


@dataclasses.dataclass(frozen=True)
class StateSettings:
  """The config's values that a train state is made of (from_config): the optimizer's learning
  rates (create_optimizer), the initial s*, m* of adaptive HML or the fixed s, m of the others
  (Eq. 3; scale_and_margin), and the layout over the devices (hml_jax/state/sharding.py). Frozen
  and hashable: the jitted steps close over it."""
  learning_rate: float
  adaptive_learning_rate: float
  adaptive_optimizer: str  # one of ADAPTIVE_OPTIMIZERS
  role_lr_mult: float
  head_learning_rate_multiplier: float  # the recipe's (hml_jax/methods/recipes.py)
  scale: float
  margin: float
  parameter_sharding: str  # 'replicated' or 'fsdp'
  fsdp_min_size: int

  @classmethod
  def from_config(cls, config) -> 'StateSettings':
    """The settings of a run's config (the one place this module reads a ConfigDict)."""
    return cls(
        learning_rate=config.learning_rate,
        adaptive_learning_rate=config.adaptive_learning_rate,
        adaptive_optimizer=config.adaptive_optimizer,
        role_lr_mult=config.role_lr_mult,
        head_learning_rate_multiplier=recipes.from_config(config).head_learning_rate_multiplier,
        scale=config.scale,
        margin=config.margin,
        parameter_sharding=config.parameter_sharding,
        fsdp_min_size=config.fsdp_min_size)


def train_state_shardings(settings: StateSettings, state_or_shapes, mesh):
  """The NamedSharding of every array of a train state (or of its train_state_shapes) under
  settings.parameter_sharding and settings.fsdp_min_size (hml_jax/state/sharding.py)."""
  return sharding.state_shardings(state_or_shapes, mesh, settings.parameter_sharding,
                                  settings.fsdp_min_size)


def scale_and_margin(params, settings: StateSettings, method=None):
  """(s, m) of the margin sigmoid: the learned s*, m* for adaptive HML, else the settings' fixed
  pair (or the method's own fixed margin, 0 for the normalized sigmoid)."""
  if 'scale_margin' in params:
    return params['scale_margin']['scale'], params['scale_margin']['margin']
  margin = settings.margin
  if method is not None and method.fixed_margin is not None:
    margin = method.fixed_margin
  return jnp.float32(settings.scale), jnp.float32(margin)
