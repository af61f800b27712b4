"""Losses as pure functions of arrays (hml_jax.methods names them and says how each is trained).

Shapes: logits / cosines (batch, num_labels); observed_labels (batch, num_labels) with 1 for an
observed positive and 0 for a negative or an unknown label ("assume negative", Cole et al. 2021).
"""
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hml_jax.models import heads
from hml_jax.models import initializers
from hml_jax.runtime import errors

Array = jax.Array


def binary_cross_entropy(logits: Array, labels: Array) -> Array:
  """Eq. 1 on pre-sigmoid logits; per-entry losses summed over labels and averaged over the batch
  *and* the labels (Cole et al.'s normalization: sum / (batch_size * num_labels)).

  optax's sigmoid_binary_cross_entropy works on logits (log-sigmoid), so it is exact even where
  sigmoid(logit) rounds to 0 or 1 in float32; no log of a clipped probability.
  """
  labels = labels.astype(jnp.float32)
  return jnp.mean(optax.losses.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels))


def assume_negative(logits: Array, observed_labels: Array) -> Array:
  """AN baseline: BCE with every unknown label treated as a negative (Cole et al. 2021)."""
  return binary_cross_entropy(logits, observed_labels)


# The baselines below follow Cole et al.'s losses.py (and Ridnik et al.'s / Zhou et al.'s code)
# term by term, with one deliberate difference: logs are taken of sigmoids in logit space
# (log_sigmoid), exact everywhere, where their code takes -log(p + 1e-5) of a float probability
# (which caps an entry's loss at 11.5 and flattens its gradient once p < 1e-5).


def _negative_log_p(logits):
  return -jax.nn.log_sigmoid(logits.astype(jnp.float32))


def _negative_log_not_p(logits):
  return -jax.nn.log_sigmoid(-logits.astype(jnp.float32))


def assume_negative_label_smoothing(logits: Array,
                                    observed_labels: Array,
                                    ls_coef: float = 0.1) -> Array:
  """AN-LS / BCE-LS (Cole et al.): targets 1 - ls_coef for positives, ls_coef for the rest."""
  labels = observed_labels.astype(jnp.float32)
  positive = (1 - ls_coef) * _negative_log_p(logits) + ls_coef * _negative_log_not_p(logits)
  negative = (1 - ls_coef) * _negative_log_not_p(logits) + ls_coef * _negative_log_p(logits)
  return jnp.mean(labels * positive + (1 - labels) * negative)


def weak_assume_negative(logits: Array, observed_labels: Array) -> Array:
  """WAN (Cole et al.): AN with each negative's loss weighted 1 / (num_labels - 1)."""
  labels = observed_labels.astype(jnp.float32)
  num_labels = labels.shape[-1]
  return jnp.mean(labels * _negative_log_p(logits) + (1 - labels) * _negative_log_not_p(logits) /
                  (num_labels - 1))


def expected_positive_regularizer(probabilities: Array, expected_num_pos: float) -> Array:
  """(mean over the batch of sum_j p_j - k)^2 (Cole et al.'s norm='2')."""
  return (jnp.mean(jnp.sum(probabilities, axis=-1)) - expected_num_pos)**2


def expected_positive_regularization(logits: Array, observed_labels: Array,
                                     expected_num_pos: float) -> Array:
  """EPR (Cole et al.): -log p on observed positives only, plus the expected-positive
  regularizer divided by num_labels^2 (not by the batch size)."""
  labels = observed_labels.astype(jnp.float32)
  num_labels = labels.shape[-1]
  regularizer = expected_positive_regularizer(jax.nn.sigmoid(logits.astype(jnp.float32)),
                                              expected_num_pos)
  return jnp.mean(labels * _negative_log_p(logits)) + regularizer / num_labels**2


def entropy_maximization(logits: Array, observed_labels: Array, alpha: float) -> Array:
  """EM (Zhou et al., ECCV 2022): -log p on observed positives; on unobserved labels
  -alpha * H(p), H the binary entropy, so minimizing the loss maximizes their entropy."""
  labels = observed_labels.astype(jnp.float32)
  probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
  entropy = (probabilities * _negative_log_p(logits) +
             (1 - probabilities) * _negative_log_not_p(logits))
  return jnp.mean(labels * _negative_log_p(logits) - (1 - labels) * alpha * entropy)


def asymmetric_loss(logits: Array,
                    observed_labels: Array,
                    gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0,
                    clip: float = 0.05,
                    eps: float = 1e-8) -> Array:
  """ASL (Ridnik et al., ICCV 2021), as their AsymmetricLoss with disable_torch_grad_focal_loss.

  Positives: (1 - p)^gamma_pos * log p; negatives: p_m^gamma_neg * log(1 - p_m) with the shifted
  probability p_m = max(p - clip, 0); logs floored at log(eps); the focusing weights are
  constants (stop_gradient). Reduced with Cole et al.'s mean (Ridnik et al. sum: a constant
  factor of batch_size * num_labels).
  """
  labels = observed_labels.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  probability = jax.nn.sigmoid(logits)
  one_minus_shifted = jnp.minimum(jax.nn.sigmoid(-logits) +
                                  clip, 1.0) if clip > 0 else (jax.nn.sigmoid(-logits))
  log_floor = jnp.log(eps)
  log_likelihood = (labels * jnp.maximum(jax.nn.log_sigmoid(logits), log_floor) +
                    (1 - labels) * jnp.log(jnp.maximum(one_minus_shifted, eps)))
  target_probability = probability * labels + one_minus_shifted * (1 - labels)
  weight = jax.lax.stop_gradient(
      (1 - target_probability)**(gamma_pos * labels + gamma_neg * (1 - labels)))
  return -jnp.mean(weight * log_likelihood)


def large_loss_num_modified(epoch: int, num_entries: int, delta_rel: float, permanent: bool) -> int:
  """How many unobserved entries of a batch Large Loss Matters (Kim et al., CVPR 2022) modifies.

  delta_rel is in percent per epoch, as on their command line (0.2 means 0.002). Epoch 1 is plain
  AN. LL-R and LL-Ct then modify ceil(B * C * (1 - clean_rate)) entries, the clean rate falling by
  delta_rel after each epoch (accumulated by repeated subtraction, as in their code); LL-Cp, whose
  corrections accumulate in the labels, corrects ceil(B * C * delta_rel) new entries per batch (the
  permanent-correction code of their first release, before a string compared with `is` disabled
  it).
  """
  if epoch <= 1:
    return 0
  rate = delta_rel / 100.0
  if permanent:
    return int(np.ceil(num_entries * rate))
  clean_rate = 1.0
  for _ in range(epoch - 1):
    clean_rate -= rate
  return int(np.ceil(num_entries * (1.0 - clean_rate)))


def large_loss(logits: Array, observed_labels: Array, num_modified: Array,
               correct: bool) -> Tuple[Array, Array]:
  """LL-R (correct=False) / LL-Ct, LL-Cp (correct=True) of Kim et al. (CVPR 2022).

  Among the unobserved (assumed negative) entries of the whole batch, those whose BCE is at least
  the num_modified-th largest are rejected (loss 0) or corrected (target 1 for this step).
  Returns (loss averaged over batch x labels, the modified entries); the latter is what LL-Cp
  writes into the labels. (Their first release stored only the entries strictly above the
  threshold, one fewer than it corrected, so a batch with one correction stored none; we store
  the entries that were corrected, as the paper describes.)
  """
  labels = observed_labels.astype(jnp.float32)
  loss = labels * _negative_log_p(logits) + (1 - labels) * _negative_log_not_p(logits)
  corrected = _negative_log_p(logits)  # target 1 (their BCE(logits, 1 - y) on y = 0)
  unobserved_loss = (1 - labels) * loss
  descending = -jnp.sort(-unobserved_loss.ravel())
  # At most every unobserved entry can be modified (the clean rate has no floor).
  num_modified = jnp.minimum(num_modified, jnp.sum(labels == 0))
  threshold = jnp.where(num_modified > 0, descending[jnp.clip(num_modified - 1, 0,
                                                              descending.size - 1)], jnp.inf)
  keep = (unobserved_loss < threshold) | (labels == 1)  # observed positives are never modified
  final = jnp.where(keep, loss, corrected if correct else 0.0)
  return jnp.mean(final), (~keep) & (labels == 0)


def large_loss_rejection(logits, observed_labels, num_modified):
  """LL-R: the largest unobserved losses are left out of the loss."""
  return large_loss(logits, observed_labels, num_modified, correct=False)[0]


def large_loss_temporary_correction(logits, observed_labels, num_modified):
  """LL-Ct: the largest unobserved losses are taken with target 1 for this step only."""
  return large_loss(logits, observed_labels, num_modified, correct=True)[0]


def large_loss_permanent_correction(logits, observed_labels, num_modified):
  """LL-Cp: as LL-Ct, and the corrected entries become observed positives for good: returns
  (loss, corrected entries), which train.py writes into the label state."""
  return large_loss(logits, observed_labels, num_modified, correct=True)


def large_loss_schedule(name: str):
  """schedule(epoch, entries_per_batch, delta_rel) -> {'num_modified': ...} for config.loss =
  name. delta_rel: Kim et al.'s relative rate (config.delta_rel, or where that is negative
  config.delta_rel_by_method[name]: their defaults in configs/default.py, the per-dataset values
  in configs/voc.py etc.; training/loss_arguments.py resolves it)."""
  permanent = name == 'll_cp'

  def schedule(epoch, entries_per_batch, delta_rel):
    return {'num_modified': large_loss_num_modified(epoch, entries_per_batch, delta_rel, permanent)}

  return schedule


def role(logits: Array, observed_labels: Array, estimator_logits: Array,
         expected_num_pos: float) -> Array:
  """ROLE (Cole et al., CVPR 2021): the classifier f and a per-image label estimator g train each
  other. estimator_logits: the rows of g (logits of the estimated labels) for this batch.

  With p = sigmoid(logits), e = sigmoid(estimator_logits), B = stop_gradient:
    0.5 * ([y] (-log p - log e) + BCE(p; target B(e)) + BCE(e; target B(p)))
  averaged over batch x labels, plus 0.5 * (EPR(p) + EPR(e)) / num_labels^2. So f learns from the
  observed positives and g's estimates, g from the observed positives and f's predictions, and
  both are pulled to expected_num_pos positives per image.
  """
  labels = observed_labels.astype(jnp.float32)
  num_labels = labels.shape[-1]
  logits = logits.astype(jnp.float32)
  estimator_logits = estimator_logits.astype(jnp.float32)
  predictions = jax.nn.sigmoid(logits)
  estimates = jax.nn.sigmoid(estimator_logits)
  positives = labels * (_negative_log_p(logits) + _negative_log_p(estimator_logits))
  fixed_estimates = jax.lax.stop_gradient(estimates)
  fixed_predictions = jax.lax.stop_gradient(predictions)
  classifier_cross = (fixed_estimates * _negative_log_p(logits) +
                      (1 - fixed_estimates) * _negative_log_not_p(logits))
  estimator_cross = (fixed_predictions * _negative_log_p(estimator_logits) +
                     (1 - fixed_predictions) * _negative_log_not_p(estimator_logits))
  regularizer = 0.5 * (expected_positive_regularizer(predictions, expected_num_pos) +
                       expected_positive_regularizer(estimates, expected_num_pos)) / num_labels**2
  return jnp.mean(0.5 * positives + 0.5 * (classifier_cross + estimator_cross)) + regularizer


def role_estimator_init(observed_labels, rng: Array) -> Array:
  """Cole et al.'s initial estimator logits: logit(0.995) for observed positives, uniform in
  [-logit(0.6), logit(0.6)] for unknown labels. (num_images, num_labels) float32."""
  bound = float(np.log(0.6 / 0.4))
  # Drawn flat: the same numbers, compiled in a fraction of the time (hml_jax/models/initializers.py).
  unknown = initializers.flat_draw(jax.random.uniform, rng, np.shape(observed_labels), jnp.float32,
                                   -bound, bound)
  return jnp.where(jnp.asarray(observed_labels) == 1, jnp.float32(np.log(0.995 / 0.005)), unknown)


def entropy_maximization_pseudo_labels(logits: Array, label_state: Array, alpha: float,
                                       beta: float) -> Array:
  """EM + APL (Zhou et al., ECCV 2022). label_state: 1 = observed positive, 0 = unknown,
  -s (0 <= s < 1) = a pseudo-label with soft target s set by asymmetric_pseudo_labels.

  Observed positives: -log p; unknown: -alpha * H(p) (EM); pseudo-labelled:
  beta * BCE(p; target s). Averaged over batch x labels.
  """
  state = label_state.astype(jnp.float32)
  probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))
  negative_log_p, negative_log_not_p = _negative_log_p(logits), _negative_log_not_p(logits)
  entropy = probabilities * negative_log_p + (1 - probabilities) * negative_log_not_p
  soft_target = -state
  pseudo = beta * (soft_target * negative_log_p + (1 - soft_target) * negative_log_not_p)
  loss = jnp.where(state == 1, negative_log_p, jnp.where(state == 0, -alpha * entropy, pseudo))
  return jnp.mean(loss)


def asymmetric_pseudo_labels(label_state: np.ndarray,
                             probabilities: np.ndarray,
                             unknown_per_class: np.ndarray,
                             num_epochs: int,
                             warmup_epoch: int,
                             neg_proportion: float = 0.9) -> np.ndarray:
  """One APL pass of Zhou et al. (after each epoch >= warmup_epoch), NumPy.

  For each class j, the n_j = int(neg_proportion * unknown_per_class[j] / (num_epochs -
  warmup_epoch)) entries still unknown (0) with the lowest predicted probability get the soft
  negative pseudo-label -p (stored negative; never revised). unknown_per_class: the count of
  unknown entries per class at the start of training. Returns the new label state.
  """
  state = np.array(label_state, np.float32, copy=True)
  for label in range(state.shape[1]):
    count = int(neg_proportion * unknown_per_class[label] / (num_epochs - warmup_epoch))
    candidates = np.nonzero(state[:, label] == 0)[0]
    chosen = candidates[np.argsort(probabilities[candidates, label], kind='stable')[:count]]
    # Stored negative; floored so that a probability that rounded to 0 does not read as unknown.
    state[chosen, label] = -np.maximum(probabilities[chosen, label], np.finfo(np.float32).tiny)
  return state


MARGIN_PLACEMENTS = ('both', 'positives', 'negatives', 'none')


def entry_margins(labels: Array, margin: Array, margin_on: str = 'both') -> Array:
  """The margin of each entry (batch, num_labels) for a placement of paper Table 5."""
  if margin_on not in MARGIN_PLACEMENTS:
    raise errors.InvalidInputError(
        f'Unknown margin placement {margin_on!r} (config.margin_on); choose one of '
        f'{list(MARGIN_PLACEMENTS)}.')
  on_positives = margin_on in ('both', 'positives')
  on_negatives = margin_on in ('both', 'negatives')
  labels = labels.astype(jnp.float32)
  margin = jnp.asarray(margin, jnp.float32)
  return (labels * (margin if on_positives else 0.0) + (1 - labels) *
          (margin if on_negatives else 0.0))


def adaptive_loss(cos: Array,
                  labels: Array,
                  scale: Array,
                  margin: Array,
                  margin_on: str = 'both') -> Array:
  """The gradient-balancing term of Eq. 6-7, summed over the whole mini-batch (a scalar).

  L_adpt = | sum_{positives} (1 - p^a) - sum_{negatives} p^a |, with
  p^a = sigmoid(s* cos(arccos(B(cos)) + m*)) where B = stop_gradient: this term trains only the
  scale s* and the margin m*, never the embeddings or the backbone.
  """
  labels = labels.astype(jnp.float32)
  margins = entry_margins(labels, margin, margin_on)
  probabilities = jax.nn.sigmoid(heads.margin_logits(jax.lax.stop_gradient(cos), scale, margins))
  positive_pull = jnp.sum(labels * (1.0 - probabilities))
  negative_pull = jnp.sum((1.0 - labels) * probabilities)
  return jnp.abs(positive_pull - negative_pull)


def spread_log_scale(cos: Array,
                     labels: Array,
                     margin: Array,
                     logit_spread: float,
                     margin_on: str = 'both') -> Array:
  """log of the scale at which the batch's margin logits s cos(arccos(c) + m) have standard
  deviation logit_spread (over all batch x num_labels entries): log(tau) - log(std(cos(theta+m))).
  cos, labels: (batch, num_labels); a scalar."""
  adjusted = heads.cos_with_margin(cos, entry_margins(labels.astype(jnp.float32), margin,
                                                      margin_on))
  return jnp.log(logit_spread) - jnp.log(jnp.std(adjusted) + 1e-6)


def scale_spread_loss(cos: Array,
                      labels: Array,
                      scale: Array,
                      margin: Array,
                      logit_spread: float,
                      margin_on: str = 'both') -> Array:
  """0.5 (log s* - B(spread_log_scale))^2: pulls s* towards the scale of logit spread tau; with
  B = stop_gradient on the cosines and m*, it trains s* alone."""
  target = spread_log_scale(jax.lax.stop_gradient(cos), labels, jax.lax.stop_gradient(margin),
                            logit_spread, margin_on)
  return 0.5 * jnp.square(jnp.log(scale) - jax.lax.stop_gradient(target))


def hml_fixed(cos: Array,
              observed_labels: Array,
              scale: float,
              margin: float,
              margin_on: str = 'both') -> Array:
  """HML with a fixed scale and margin: BCE on the margin sigmoid p^m of Eq. 4 (the margin on
  the entries that margin_on names; Table 5's best and the default is 'both'). With margin 0 it
  is the normalized sigmoid of Eq. 3."""
  margins = entry_margins(observed_labels, margin, margin_on)
  return binary_cross_entropy(heads.margin_logits(cos, scale, margins), observed_labels)


# How s* is learned (config.adaptive_scale; docs/methods.md, "How s* and m* are learned").
ADAPTIVE_SCALES = ('spread', 'balance', 'likelihood')


def hml(cos: Array,
        observed_labels: Array,
        scale: Array,
        margin: Array,
        margin_on: str = 'both',
        adaptive_scale: str = 'spread',
        logit_spread: float = 1.1) -> Array:
  """Adaptive HML, Eq. 5: L_BCE(p^m) + L_adpt(p^a), and for adaptive_scale='spread' a term that
  sets s*.

  The BCE sees s*, m* through stop_gradient (it trains the embeddings and the backbone); every
  other term sees the cosines through stop_gradient (it trains s*, m* only). Which term trains
  which of s*, m*:
    'spread' (default): m* by Eq. 6; s* by scale_spread_loss (the scale at which the batch's
      margin logits have standard deviation logit_spread). Eq. 6 alone is satisfied by a whole
      curve of (s, m); this picks one point on it.
    'balance' (the paper's literal reading): both by Eq. 6.
    'likelihood': m* by Eq. 6; s* by the BCE's own gradient (the scale the likelihood prefers).
  cos, observed_labels: (batch, num_labels); scale, margin: scalars. Returns a scalar.
  """
  sg = jax.lax.stop_gradient
  if adaptive_scale == 'balance':
    bce = hml_fixed(cos, observed_labels, sg(scale), sg(margin), margin_on)
    return bce + adaptive_loss(cos, observed_labels, scale, margin, margin_on)
  if adaptive_scale == 'spread':
    bce = hml_fixed(cos, observed_labels, sg(scale), sg(margin), margin_on)
    return (bce + adaptive_loss(cos, observed_labels, sg(scale), margin, margin_on) +
            scale_spread_loss(cos, observed_labels, scale, margin, logit_spread, margin_on))
  if adaptive_scale == 'likelihood':
    bce = hml_fixed(cos, observed_labels, scale, sg(margin), margin_on)
    return bce + adaptive_loss(cos, observed_labels, sg(scale), margin, margin_on)
  raise errors.InvalidInputError(f'Unknown config.adaptive_scale={adaptive_scale!r}; choose one of '
                                 f'{list(ADAPTIVE_SCALES)}.')
