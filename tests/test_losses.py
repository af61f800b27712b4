import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax import heads, losses, methods


def numpy_bce(logits, labels):
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  return float(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))


def numpy_adaptive(cos, labels, scale, margin):
  theta = np.arccos(np.clip(np.asarray(cos, np.float64), -1, 1))
  p = 1 / (1 + np.exp(-scale * np.cos(theta + margin)))
  return abs(np.sum(labels * (1 - p)) - np.sum((1 - labels) * p))


def random_batch(seed=0, shape=(8, 6)):
  rng = np.random.RandomState(seed)
  cos = rng.uniform(-0.9, 0.9, size=shape).astype(np.float32)
  labels = (rng.uniform(size=shape) < 0.3).astype(np.float32)
  return cos, labels


def test_bce_matches_numpy_and_is_stable_for_huge_logits():
  cos, labels = random_batch()
  logits = 5 * cos
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, labels),
                             numpy_bce(logits, labels),
                             rtol=1e-5)
  huge = np.array([[100.0, -100.0]], np.float32)
  value = losses.binary_cross_entropy(huge, np.array([[0.0, 1.0]]))
  np.testing.assert_allclose(value, 100.0, rtol=1e-5)


def test_adaptive_loss_matches_numpy():
  cos, labels = random_batch(1)
  np.testing.assert_allclose(losses.adaptive_loss(cos, labels, 20.0, 0.3),
                             numpy_adaptive(cos, labels, 20.0, 0.3),
                             rtol=1e-4)


def test_adaptive_loss_gradients_reach_only_scale_and_margin():
  cos, labels = random_batch(2)
  grad_cos, grad_scale, grad_margin = jax.grad(losses.adaptive_loss,
                                               argnums=(0, 2, 3))(jnp.asarray(cos), labels,
                                                                  jnp.float32(20.0),
                                                                  jnp.float32(0.3))
  assert np.all(np.asarray(grad_cos) == 0.0)
  assert float(grad_scale) != 0.0 and float(grad_margin) != 0.0
  # Against central finite differences of the NumPy transcription.
  for index, (value, step) in enumerate([(20.0, 1e-3), (0.3, 1e-5)]):
    args = [20.0, 0.3]
    args[index] = value + step
    plus = numpy_adaptive(cos, labels, *args)
    args[index] = value - step
    minus = numpy_adaptive(cos, labels, *args)
    np.testing.assert_allclose([grad_scale, grad_margin][index], (plus - minus) / (2 * step),
                               rtol=2e-3)


def test_hml_bce_gradient_never_reaches_scale_and_margin():
  cos, labels = random_batch(3)
  grad_cos, grad_scale, grad_margin = jax.grad(losses.hml, argnums=(0, 2, 3))(jnp.asarray(cos),
                                                                              labels,
                                                                              jnp.float32(20.0),
                                                                              jnp.float32(0.3))
  adaptive_scale, adaptive_margin = jax.grad(losses.adaptive_loss,
                                             argnums=(2, 3))(jnp.asarray(cos), labels,
                                                             jnp.float32(20.0), jnp.float32(0.3))
  # s*, m* get exactly the adaptive term's gradient; the cosines exactly the BCE's.
  np.testing.assert_allclose(grad_scale, adaptive_scale, rtol=1e-6)
  np.testing.assert_allclose(grad_margin, adaptive_margin, rtol=1e-6)
  bce_grad_cos = jax.grad(losses.hml_fixed)(jnp.asarray(cos), labels, 20.0, 0.3)
  np.testing.assert_allclose(grad_cos, bce_grad_cos, rtol=1e-6)
  assert np.any(np.asarray(grad_cos) != 0)


def test_hml_value_is_bce_of_margin_sigmoid_plus_adaptive_term():
  cos, labels = random_batch(4)
  logits = heads.margin_logits(cos, 20.0, 0.3)
  expected = numpy_bce(np.asarray(logits), labels) + numpy_adaptive(cos, labels, 20.0, 0.3)
  np.testing.assert_allclose(losses.hml(cos, labels, 20.0, 0.3), expected, rtol=1e-4)


def test_registry_and_errors():
  assert methods.get_loss('an') is losses.assume_negative
  assert methods.get_method('hml').learns_scale_and_margin
  assert methods.get_method('hml').head == 'cosine' and methods.get_method('an').head == 'linear'
  with pytest.raises(ValueError, match="'nope'.*choose one of"):
    methods.get_loss('nope')
