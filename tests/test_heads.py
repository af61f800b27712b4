import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax.models import heads

BOUNDARY_COSINES = np.array([-1.0, -1.0 + 1e-7, 0.0, 1.0 - 1e-7, 1.0], np.float32)


def reference_margin_logits(cos, scale, margin):
  """NumPy transcription of paper Eq. 4 with ArcFace's continuation past theta + m > pi."""
  cos = np.asarray(cos, np.float64)
  theta = np.arccos(np.clip(cos, -1, 1))
  value = np.cos(theta + margin)
  past_pi = theta + margin > np.pi
  value = np.where(past_pi, cos - margin * np.sin(margin), value)
  before_zero = theta + margin < 0
  value = np.where(before_zero, cos + margin * np.sin(margin), value)
  return scale * value


@pytest.mark.parametrize('scale,margin', [(20.0, 0.3), (1.0, 0.0), (40.0, 0.5), (10.0, -0.2)])
def test_margin_logits_matches_numpy_reference(scale, margin):
  cos = np.random.RandomState(0).uniform(-1, 1, size=(64, 7)).astype(np.float32)
  cos = np.concatenate([cos.ravel(), BOUNDARY_COSINES])
  got = np.asarray(heads.margin_logits(cos, scale, margin))
  np.testing.assert_allclose(got,
                             reference_margin_logits(cos, scale, margin),
                             atol=2e-5 * scale,
                             rtol=1e-5)


def test_margin_zero_is_the_normalized_sigmoid_of_eq3():
  cos = np.linspace(-1, 1, 101, dtype=np.float32)
  np.testing.assert_allclose(heads.margin_logits(cos, 20.0, 0.0), 20.0 * cos, atol=1e-5)


@pytest.mark.parametrize('margin', [0.3, 0.0, 1.0, -0.3])
def test_margin_logits_has_finite_gradients_at_the_boundaries(margin):
  for argument in (0, 1, 2):
    grad = jax.vmap(jax.grad(heads.margin_logits, argnums=argument),
                    in_axes=(0, None, None))(jnp.asarray(BOUNDARY_COSINES), jnp.float32(20.0),
                                             jnp.float32(margin))
    assert np.all(np.isfinite(np.asarray(grad))), (argument, margin, grad)
  values = heads.margin_logits(BOUNDARY_COSINES, 20.0, margin)
  assert np.all(np.isfinite(np.asarray(values)))


@pytest.mark.parametrize('margin', [0.3, 0.8, 2.0, -0.5, 2.33, -2.33])
def test_margin_logits_is_increasing_in_cos_even_past_pi(margin):
  cos = np.linspace(-1, 1, 20001, dtype=np.float32)
  values = np.asarray(heads.margin_logits(cos, 1.0, margin))
  # Non-decreasing up to float32 rounding where the curve is flat (theta + m -> pi), and it ends
  # below where it starts past the turning point instead of rising again.
  assert np.all(np.diff(values) >= -1e-6), margin
  assert values[0] < values[1000] < values[-1]
  if abs(margin) <= np.pi / 2:
    # (For |m| > pi/2 the derivative at exactly |c| = 1, where sin(theta) = 0 is not
    # differentiable, is taken as cos(m) < 0; the values above stay increasing.)
    grads = np.asarray(
        jax.vmap(jax.grad(heads.margin_logits), in_axes=(0, None, None))(jnp.asarray(cos), 1.0,
                                                                         margin))
    assert np.all(grads >= 0)


def test_monotonic_margin_limit_is_where_the_line_starts_inside_the_curve():
  """Past MONOTONIC_MARGIN_LIMIT the ArcFace line starts above the curve's end value -1, so the
  map falls at the switch: the documented limit, the root of cos(m) + m sin(m) = 1."""
  limit = heads.MONOTONIC_MARGIN_LIMIT
  assert abs(np.cos(limit) + limit * np.sin(limit) - 1.0) < 1e-9
  margin = 2.4
  switch = -np.cos(margin)  # theta + m = pi
  below, above = np.float32(switch - 1e-3), np.float32(switch + 1e-3)
  values = np.asarray(heads.margin_logits(np.array([below, above]), 1.0, margin))
  assert values[0] > values[1]  # not increasing: why validate_config rejects such a margin


def test_gradient_in_cos_matches_analytic_derivative():
  # d/dc cos(arccos c + m) = cos(m) + c sin(m) / sqrt(1 - c^2).
  cos = np.linspace(-0.9, 0.9, 19).astype(np.float32)
  margin = 0.3
  grads = jax.vmap(jax.grad(heads.margin_logits), in_axes=(0, None, None))(cos, 1.0, margin)
  expected = np.cos(margin) + cos * np.sin(margin) / np.sqrt(1 - cos.astype(np.float64)**2)
  np.testing.assert_allclose(grads, expected, rtol=1e-4)


def test_cosine_similarity_is_float32_bounded_and_safe_for_zero_vectors():
  features = np.random.RandomState(1).normal(size=(4, 16)).astype(np.float32)
  features[0] = 0.0
  embeddings = np.random.RandomState(2).normal(size=(3, 16)).astype(np.float32)
  embeddings[1] = features[1] * 3.0
  cos = np.asarray(heads.cosine_similarity(jnp.asarray(features, jnp.bfloat16), embeddings))
  assert cos.dtype == np.float32 and cos.shape == (4, 3)
  assert np.all(cos[0] == 0.0)
  assert np.all(np.abs(cos) <= 1.0)
  np.testing.assert_allclose(cos[1, 1], 1.0, atol=1e-2)
  exact = (features[2:] @ embeddings.T) / np.outer(np.linalg.norm(features[2:], axis=1),
                                                   np.linalg.norm(embeddings, axis=1))
  np.testing.assert_allclose(heads.cosine_similarity(features, embeddings)[2:], exact, atol=1e-6)


def test_cosine_head_stores_embeddings_without_bias():
  head = heads.CosineHead(num_labels=5)
  variables = head.init(jax.random.key(0), jnp.ones((2, 8)))
  assert jax.tree_util.tree_map(jnp.shape, variables['params']) == {'label_embeddings': (8, 5)}


def test_label_correlation_is_eq8():
  embeddings = np.random.RandomState(3).normal(size=(6, 10)).astype(np.float32)
  normalized = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  cos = normalized @ normalized.T
  expected = 1 / (1 + np.exp(-reference_margin_logits(cos, 20.0, 0.3)))
  got = np.asarray(heads.label_correlation(embeddings, 20.0, 0.3))
  np.testing.assert_allclose(got, expected, atol=1e-4)
  np.testing.assert_allclose(got, got.T, atol=1e-6)
