"""The methods: each config.loss name with its head, its loss and what train.py needs to know
about it (hml_jax.methods.losses has the loss functions).

One place says how a method behaves, so that no other module branches on a head's name: a
Method turns its head's outputs into logits, names its label embeddings (Eq. 8), and says which
parameters and label state its loss trains.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import numpy as np

from hml_jax.methods import losses
from hml_jax.models import heads
from hml_jax.runtime import errors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Method:
  """What train.py needs to know about a method.

  head: 'cosine' (outputs are cosines, scored by margin_logits) or 'linear' (outputs are logits).
  loss: loss(outputs, observed_labels, **hyperparameters) -> scalar.
  hyperparameters: the loss's keyword arguments, each read from the config key of that name.
  learns_scale_and_margin: s* and m* are trainable parameters (adaptive HML) rather than the
    config's fixed config.scale and config.margin.
  fixed_margin: a margin that the method always uses instead of config.margin.
  schedule: schedule(epoch, entries_per_batch, delta_rel) -> more keyword arguments of the loss
    that change with the epoch (computed on the host, passed to the jitted step as arrays).
  updates_labels: the loss returns (loss, entries to make observed positives); the observed
    labels then live in the train state (checkpointed with it) instead of the input pipeline.
  pseudo_labels: the labels live in the train state too, and after each epoch from
    config.warmup_epoch on, asymmetric_pseudo_labels adds pseudo-labels to them.
  label_estimator: the loss takes estimator_logits, the batch's rows of a (num_train_images,
    num_labels) parameter trained with the rest at config.role_lr_mult times the learning rate.
  """
  head: str
  loss: Callable[..., Array]
  hyperparameters: Tuple[str, ...] = ()
  learns_scale_and_margin: bool = False
  fixed_margin: Optional[float] = None
  schedule: Optional[Callable[..., Dict[str, int]]] = None
  updates_labels: bool = False
  label_estimator: bool = False  # ROLE: the loss takes estimator_logits, rows of a parameter
  pseudo_labels: bool = False

  @property
  def labels_in_state(self) -> bool:
    return self.updates_labels or self.pseudo_labels

  @property
  def has_scale_and_margin(self) -> bool:
    """Its outputs are cosines, scored through the margin sigmoid's s and m (a cosine head);
    otherwise they are logits (a linear head)."""
    return self.head == 'cosine'

  def logits(self, outputs: Array, scale, margin) -> Array:
    """Pre-sigmoid scores of the outputs: s * cos(arccos(c) + m) for a cosine head (margin may
    be one per entry, entry_margins), the outputs themselves for a linear head."""
    if self.has_scale_and_margin:
      return heads.margin_logits(outputs, scale, margin)
    return outputs

  def label_embeddings(self, head_params) -> np.ndarray:
    """(num_labels, dim): a cosine head's label embeddings, or a linear head's weight columns
    (what Eq. 8 compares)."""
    weights = (head_params['label_embeddings']
               if self.has_scale_and_margin else head_params['classifier']['kernel'])
    return np.asarray(weights).T


METHODS = {
    # Cole et al. (CVPR 2021). 'bce' is 'an' on full labels: the same function.
    'bce':
        Method(head='linear', loss=losses.assume_negative),
    'an':
        Method(head='linear', loss=losses.assume_negative),
    'bce_ls':
        Method(head='linear',
               loss=losses.assume_negative_label_smoothing,
               hyperparameters=('ls_coef',)),
    'an_ls':
        Method(head='linear',
               loss=losses.assume_negative_label_smoothing,
               hyperparameters=('ls_coef',)),
    'wan':
        Method(head='linear', loss=losses.weak_assume_negative),
    'epr':
        Method(head='linear',
               loss=losses.expected_positive_regularization,
               hyperparameters=('expected_num_pos',)),
    'role':
        Method(head='linear',
               loss=losses.role,
               hyperparameters=('expected_num_pos',),
               label_estimator=True),
    # Zhou et al. (ECCV 2022) and Ridnik et al. (ICCV 2021).
    'em':
        Method(head='linear', loss=losses.entropy_maximization, hyperparameters=('alpha',)),
    'em_apl':
        Method(head='linear',
               loss=losses.entropy_maximization_pseudo_labels,
               hyperparameters=('alpha', 'beta'),
               pseudo_labels=True),
    'asl':
        Method(head='linear',
               loss=losses.asymmetric_loss,
               hyperparameters=('gamma_neg', 'gamma_pos', 'clip')),
    # Kim et al. (CVPR 2022): Large Loss Matters.
    'll_r':
        Method(head='linear',
               loss=losses.large_loss_rejection,
               schedule=losses.large_loss_schedule('ll_r')),
    'll_ct':
        Method(head='linear',
               loss=losses.large_loss_temporary_correction,
               schedule=losses.large_loss_schedule('ll_ct')),
    'll_cp':
        Method(head='linear',
               loss=losses.large_loss_permanent_correction,
               schedule=losses.large_loss_schedule('ll_cp'),
               updates_labels=True),
    # HML (this paper) and its ablations.
    'hml':
        Method(head='cosine',
               loss=losses.hml,
               hyperparameters=('margin_on', 'adaptive_scale', 'logit_spread'),
               learns_scale_and_margin=True),
    'hml_fixed':
        Method(head='cosine', loss=losses.hml_fixed, hyperparameters=('margin_on',)),
    # Eq. 3: the hyperspherical head without a margin (hml_fixed with m = 0).
    'normalized_sigmoid':
        Method(head='cosine', loss=losses.hml_fixed, fixed_margin=0.0),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise errors.InvalidInputError(
        f'Unknown loss {name!r} (config.loss); choose one of {sorted(METHODS)}.')
  return METHODS[name]


def get_loss(name: str) -> Callable[..., Array]:
  """The loss function registered under `name` (config.loss)."""
  return get_method(name).loss
