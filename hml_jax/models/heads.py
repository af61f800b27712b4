"""Classifier heads: the hyperspherical (cosine) head of HML and the linear baseline head.

Shapes: features (batch, feature_dim); label embeddings (num_labels, feature_dim);
cosines and logits (batch, num_labels).
"""
from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from hml_jax.models import initializers

Array = jax.Array
# Largest |m| for which cos_with_margin is strictly increasing in c: the root of
# cos(m) + m*sin(m) = 1 (see cos_with_margin).
MONOTONIC_MARGIN_LIMIT = 2.3311223704
# The learned m* (adaptive HML) is kept within [-LEARNED_MARGIN_BOUND, LEARNED_MARGIN_BOUND]
# after every step: 2.3311 is below the limit even once rounded to float32 (2.33109999), so the
# map stays strictly increasing whatever the adaptive loss asks for.
LEARNED_MARGIN_BOUND = 2.3311

Scalar = Union[float, Array]

# Norms are floored at this value so that an all-zero feature (possible after a ReLU) or an
# all-zero embedding gives a cosine of 0 instead of NaN.
NORM_EPS = 1e-12


def cosine_similarity(features: Array, embeddings: Array) -> Array:
  """cos_ij = <w_j, x_i> / (|w_j| |x_i|) in float32; (batch, dim), (labels, dim) -> (batch, labels)."""
  features = features.astype(jnp.float32)
  embeddings = embeddings.astype(jnp.float32)
  feature_norms = jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), NORM_EPS)
  embedding_norms = jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), NORM_EPS)
  cosines = (features / feature_norms) @ (embeddings / embedding_norms).T
  # Rounding can push the dot product of two unit vectors just past +-1.
  return jnp.clip(cosines, -1.0, 1.0)


def cos_with_margin(cos: Array, margin: Scalar) -> Array:
  """cos(arccos(c) + m), elementwise, finite with finite gradients for every c in [-1, 1].

  Written as c*cos(m) - sin(theta)*sin(m) with sin(theta) = sqrt(1 - c^2), which equals
  cos(arccos(c) + m) but needs no arccos. Where theta + m leaves [0, pi] the curve cos(theta + m)
  would turn back (it is not monotonic in c there); like ArcFace we continue with the straight line
  c - m*sin(m) on that side:
    - m > 0 and theta + m > pi  (c < cos(pi - m) = -cos(m)):  c - m*sin(m);
    - m < 0 and theta + m < 0   (c > cos(-m) = cos(m)):         c + m*sin(m).
  At the switch the line starts at -(cos(m) + |m|*sin|m|) (or its negative), beyond the curve's
  end value -1 (+1) while cos(m) + |m|*sin|m| >= 1, i.e. for |m| <= 2.3311 rad (133.6 degrees):
  there the map is strictly increasing in c. Beyond that the line starts inside (-1, 1) and the
  map is not monotonic near the switch (tests/test_heads.py shows both); the paper's margins are
  0-0.4, and training/config_checks.validate_config rejects an initial margin (config.margin) beyond the limit.
  Both branches are finite everywhere, so jnp.where does not leak NaN gradients.
  """
  cos = jnp.clip(jnp.asarray(cos, jnp.float32), -1.0, 1.0)
  margin = jnp.asarray(margin, jnp.float32)
  # sqrt has an infinite derivative at 0 (|c| = 1), so take it only where 1 - c^2 > 0 and feed the
  # other branch a harmless 1 ("double where"): exact values, finite gradients everywhere.
  sin_squared = 1.0 - cos * cos
  positive = sin_squared > 0
  sin_theta = jnp.where(positive, jnp.sqrt(jnp.where(positive, sin_squared, 1.0)), 0.0)
  on_curve = cos * jnp.cos(margin) - sin_theta * jnp.sin(margin)
  past_pi = (margin > 0) & (cos < -jnp.cos(margin))
  below_zero = (margin < 0) & (cos > jnp.cos(margin))
  straight = jnp.where(past_pi, cos - margin * jnp.sin(margin), cos + margin * jnp.sin(margin))
  return jnp.where(past_pi | below_zero, straight, on_curve)


def bound_learned_margin(margin: Array) -> Array:
  """m* projected into [-LEARNED_MARGIN_BOUND, LEARNED_MARGIN_BOUND], inside the range where
  cos_with_margin is increasing in c (projected gradient descent: a step that would leave it
  stops at its edge)."""
  return jnp.clip(margin, -LEARNED_MARGIN_BOUND, LEARNED_MARGIN_BOUND)


def margin_logits(cos: Array, scale: Scalar, margin: Scalar) -> Array:
  """Logits of the margin sigmoid, s * cos(arccos(c) + m) (paper Eq. 4; Eq. 3 when m = 0).

  p^m = sigmoid(margin_logits(cos, s, m)). The same function is used at training and test time and
  the margin applies to every label, positive or negative (paper Table 5, "Positives & Negatives").
  """
  return jnp.asarray(scale, jnp.float32) * cos_with_margin(cos, margin)


def label_correlation(embeddings, scale: Scalar, margin: Scalar) -> Array:
  """Corr(i, j) = sigmoid(s cos(arccos(cos(w_i, w_j)) + m)), paper Eq. 8: the margin sigmoid on
  pairs of label embeddings. embeddings: (num_labels, feature_dim), the paper's W (rows are label
  embeddings). Returns (num_labels, num_labels); higher means the two labels are closer on the
  sphere."""
  embeddings = jnp.asarray(embeddings, jnp.float32)
  return jax.nn.sigmoid(margin_logits(cosine_similarity(embeddings, embeddings), scale, margin))


class CosineHead(nn.Module):
  """Label embeddings W (num_labels, feature_dim), no bias; returns cosines (batch, num_labels)."""
  num_labels: int

  @nn.compact
  def __call__(self, features: Array) -> Array:
    embeddings = self.param('label_embeddings', initializers.lecun_normal(),
                            (features.shape[-1], self.num_labels))
    # Stored (feature_dim, num_labels) like a Dense kernel; the paper's W is its transpose.
    return cosine_similarity(features, embeddings.T)


class LinearHead(nn.Module):
  """The Euclidean baseline of paper Eq. 2: logits = W x + b, (batch, num_labels)."""
  num_labels: int

  @nn.compact
  def __call__(self, features: Array) -> Array:
    return nn.Dense(self.num_labels,
                    dtype=jnp.float32,
                    kernel_init=initializers.lecun_normal(),
                    name='classifier')(features.astype(jnp.float32))


def get_head(kind: str, num_labels: int) -> nn.Module:
  heads = {'cosine': CosineHead, 'linear': LinearHead}
  if kind not in heads:
    raise ValueError(f'Unknown head {kind!r}; choose one of {sorted(heads)}.')
  return heads[kind](num_labels=num_labels)
