"""Losses as pure functions of arrays, and the registry that train.py selects from.

Shapes: logits / cosines (batch, num_labels); observed_labels (batch, num_labels) with 1 for an
observed positive and 0 for a negative or an unknown label ("assume negative", Cole et al. 2021).
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from hml_jax import heads

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


def adaptive_loss(cos: Array, labels: Array, scale: Array, margin: Array) -> Array:
  """The gradient-balancing term of Eq. 6-7, summed over the whole mini-batch (a scalar).

  L_adpt = | sum_{positives} (1 - p^a) - sum_{negatives} p^a |, with
  p^a = sigmoid(s* cos(arccos(B(cos)) + m*)) where B = stop_gradient: this term trains only the
  scale s* and the margin m*, never the embeddings or the backbone.
  """
  labels = labels.astype(jnp.float32)
  probabilities = jax.nn.sigmoid(heads.margin_logits(jax.lax.stop_gradient(cos), scale, margin))
  positive_pull = jnp.sum(labels * (1.0 - probabilities))
  negative_pull = jnp.sum((1.0 - labels) * probabilities)
  return jnp.abs(positive_pull - negative_pull)


def hml_fixed(cos: Array, observed_labels: Array, scale: float, margin: float) -> Array:
  """HML with a fixed scale and margin: BCE on the margin sigmoid p^m of Eq. 4."""
  return binary_cross_entropy(heads.margin_logits(cos, scale, margin), observed_labels)


def hml(cos: Array, observed_labels: Array, scale: Array, margin: Array) -> Array:
  """Adaptive HML, Eq. 5: L_BCE(p^m) + L_adpt(p^a).

  The BCE sees the current s*, m* through stop_gradient (so it trains only the embeddings and the
  backbone); the adaptive term sees the cosines through stop_gradient (so it trains only s*, m*).
  """
  bce = hml_fixed(cos, observed_labels, jax.lax.stop_gradient(scale),
                  jax.lax.stop_gradient(margin))
  return bce + adaptive_loss(cos, observed_labels, scale, margin)


@dataclasses.dataclass(frozen=True)
class Method:
  """What train.py needs to know about a method.

  head: 'cosine' (outputs are cosines, scored by margin_logits) or 'linear' (outputs are logits).
  loss: loss(outputs, observed_labels, **hyperparameters) -> scalar.
  learns_scale_and_margin: s* and m* are trainable parameters (adaptive HML) rather than the
    config's fixed config.scale and config.margin.
  """
  head: str
  loss: Callable[..., Array]
  learns_scale_and_margin: bool = False


METHODS = {
    'an': Method(head='linear', loss=assume_negative),
    'hml': Method(head='cosine', loss=hml, learns_scale_and_margin=True),
    'hml_fixed': Method(head='cosine', loss=hml_fixed),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'Unknown loss {name!r} (config.loss); choose one of {sorted(METHODS)}.')
  return METHODS[name]


def get_loss(name: str) -> Callable[..., Array]:
  """The loss function registered under `name` (config.loss)."""
  return get_method(name).loss
