"""Each method's training recipe: how its authors trained it, where their code differs from one
shared loop (10 epochs of Adam on the whole network, the best epoch by validation mAP).

config.recipe = 'published' (the paper configs) applies PUBLISHED to config.loss; 'shared' (the
embedded default) trains every method in the shared loop. Each field can also be set by the
config key of its name; a negative value there means "the recipe's".

Sources (read at their public code, 2026-11-30; docs/methods.md has the table):
- Cole et al. (CVPR 2021), single-positive-multi-label, train.py: train_mode 'linear_init' for
  'an_ls' and 'role' (the only losses with linear_init_params): 25 epochs of a linear head on
  fixed ImageNet features (backbone frozen, BatchNorm statistics untouched, no augmentation),
  lr 1e-4 (an_ls) / 1e-3 (role), batch 8 / 16 (an_ls 16 on NUS-WIDE, role 8 on CUB); the best
  head by validation mAP is kept, then 10 epochs end to end with a new optimizer (ROLE's label
  estimates carried over).
- Kim et al. (CVPR 2022), LargeLossMatters, train.py: the classifier head at lr_mult = 10 times
  the learning rate; training stops once validation mAP falls more than 3 points below the best
  (`bestmap_val - map_val > 3`).
- Zhou et al. (ECCV 2022), SPML-AckTheUnknown, main.py: stops at the first epoch whose validation
  mAP is not a new best (patience 1); the best epoch is reported.
"""
import dataclasses

from hml_jax.runtime import errors

RECIPES = ('published', 'shared')


@dataclasses.dataclass(frozen=True)
class Recipe:
  # Epochs of a head trained alone on the frozen backbone's features before the end-to-end
  # epochs (0: none), at this learning rate and batch size.
  linear_init_epochs: int = 0
  linear_init_learning_rate: float = 0.0
  linear_init_batch_size: int = 0
  # The classifier head's learning rate over the backbone's.
  head_learning_rate_multiplier: float = 1.0
  # Stop after this many epochs in a row without a new best validation mAP (0: never).
  early_stopping_patience: int = 0
  # Stop once validation mAP is more than this many points below the best so far (0: never).
  early_stopping_drop: float = 0.0

  def describe(self) -> str:
    parts = []
    if self.linear_init_epochs:
      parts.append(f'linear init: {self.linear_init_epochs} epochs of the head alone on frozen '
                   f'features (lr {self.linear_init_learning_rate:g}, batch '
                   f'{self.linear_init_batch_size})')
    if self.head_learning_rate_multiplier != 1:
      parts.append(f'head learning rate x{self.head_learning_rate_multiplier:g}')
    if self.early_stopping_patience:
      parts.append(f'early stopping after {self.early_stopping_patience} epoch(s) without a '
                   'new best validation mAP')
    if self.early_stopping_drop:
      parts.append(f'early stopping once validation mAP is {self.early_stopping_drop:g} points '
                   'below the best')
    return '; '.join(parts) or 'the shared loop'


_COLE_LINEAR_INIT_EPOCHS = 25
_KIM = Recipe(head_learning_rate_multiplier=10.0, early_stopping_drop=3.0)
_ZHOU = Recipe(early_stopping_patience=1)

PUBLISHED = {
    'an_ls':
        Recipe(linear_init_epochs=_COLE_LINEAR_INIT_EPOCHS,
               linear_init_learning_rate=1e-4,
               linear_init_batch_size=8),
    'role':
        Recipe(linear_init_epochs=_COLE_LINEAR_INIT_EPOCHS,
               linear_init_learning_rate=1e-3,
               linear_init_batch_size=16),
    'll_r':
        _KIM,
    'll_ct':
        _KIM,
    'll_cp':
        _KIM,
    'em':
        _ZHOU,
    'em_apl':
        _ZHOU,
}

# Cole et al.'s linear_init_params batch sizes where they differ from the defaults above.
LINEAR_INIT_BATCH_SIZE_BY_DATASET = {('an_ls', 'hml_nus_wide'): 16, ('role', 'hml_cub'): 8}

FIELDS = tuple(field.name for field in dataclasses.fields(Recipe))


def from_config(config) -> Recipe:
  """The recipe config.loss trains with: config.recipe's, with every field whose config key is set
  (>= 0) taken from the config."""
  name = config.recipe
  if name not in RECIPES:
    raise errors.InvalidInputError(
        f"Unknown config.recipe={name!r}; choose one of {list(RECIPES)} "
        "('published': each method as its authors trained it; 'shared': one loop "
        'for all).')
  recipe = PUBLISHED.get(config.loss, Recipe()) if name == 'published' else Recipe()
  batch_size = LINEAR_INIT_BATCH_SIZE_BY_DATASET.get((config.loss, config.dataset.name))
  if name == 'published' and batch_size:
    recipe = dataclasses.replace(recipe, linear_init_batch_size=batch_size)
  overrides = {
      field: config[field]
      for field in FIELDS
      if field in config and config[field] is not None and config[field] >= 0
  }
  recipe = dataclasses.replace(recipe, **overrides)
  if recipe.linear_init_epochs > 0 and (recipe.linear_init_learning_rate <= 0 or
                                        recipe.linear_init_batch_size <= 0):
    raise errors.InvalidInputError(
        f'config.linear_init_epochs={recipe.linear_init_epochs} needs a positive '
        'config.linear_init_learning_rate and config.linear_init_batch_size (got '
        f'{recipe.linear_init_learning_rate}, {recipe.linear_init_batch_size}).')
  if recipe.head_learning_rate_multiplier <= 0:
    raise errors.InvalidInputError('config.head_learning_rate_multiplier must be positive, got '
                                   f'{recipe.head_learning_rate_multiplier}.')
  return recipe


def should_stop(recipe: Recipe, validation_maps) -> bool:
  """Whether training stops after the epochs whose validation mAPs (percent) are given, in order.
  'Best' is strictly better than every earlier epoch, as the checkpoint's choice."""
  # A NaN mAP (no positive in the split) is recorded as None: it is never the best.
  validation_maps = [float('-inf') if v is None else v for v in validation_maps]
  if not validation_maps:
    return False
  best_epoch = max(range(len(validation_maps)), key=lambda i: (validation_maps[i], -i))
  if (recipe.early_stopping_patience and
      len(validation_maps) - 1 - best_epoch >= recipe.early_stopping_patience):
    return True
  return bool(recipe.early_stopping_drop and
              validation_maps[best_epoch] - validation_maps[-1] > recipe.early_stopping_drop)
