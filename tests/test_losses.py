import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax import methods
from hml_jax.methods import losses
from hml_jax.models import heads


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


def _hml_gradients(cos, labels, scale=20.0, margin=0.3, **kwargs):
  return jax.grad(losses.hml, argnums=(0, 2, 3))(jnp.asarray(cos), labels, jnp.float32(scale),
                                                 jnp.float32(margin), **kwargs)


def numpy_spread_log_scale(cos, labels, margin, spread):
  theta = np.arccos(np.clip(np.asarray(cos, np.float64), -1, 1))
  return np.log(spread) - np.log(np.std(np.cos(theta + margin)))


def test_hml_bce_gradient_never_reaches_scale_and_margin():
  """The paper's reading ('balance'): s*, m* get exactly Eq. 6's gradient; the cosines exactly
  the BCE's."""
  cos, labels = random_batch(3)
  grad_cos, grad_scale, grad_margin = _hml_gradients(cos, labels, adaptive_scale='balance')
  adaptive_scale, adaptive_margin = jax.grad(losses.adaptive_loss,
                                             argnums=(2, 3))(jnp.asarray(cos), labels,
                                                             jnp.float32(20.0), jnp.float32(0.3))
  np.testing.assert_allclose(grad_scale, adaptive_scale, rtol=1e-6)
  np.testing.assert_allclose(grad_margin, adaptive_margin, rtol=1e-6)
  bce_grad_cos = jax.grad(losses.hml_fixed)(jnp.asarray(cos), labels, 20.0, 0.3)
  np.testing.assert_allclose(grad_cos, bce_grad_cos, rtol=1e-6)
  assert np.any(np.asarray(grad_cos) != 0)


def test_hml_value_is_bce_of_margin_sigmoid_plus_adaptive_term():
  cos, labels = random_batch(4)
  logits = heads.margin_logits(cos, 20.0, 0.3)
  expected = numpy_bce(np.asarray(logits), labels) + numpy_adaptive(cos, labels, 20.0, 0.3)
  np.testing.assert_allclose(losses.hml(cos, labels, 20.0, 0.3, adaptive_scale='balance'),
                             expected,
                             rtol=1e-4)


@pytest.mark.parametrize('scale,margin', [(5.0, 0.0), (20.0, 0.3), (40.0, 0.5)])
def test_spread_reading_value_and_gradients_against_numpy(scale, margin):
  """'spread' (the default): value = BCE + Eq. 6 + 0.5 (log s - log(tau / std cos(theta+m)))^2;
  the cosines get the BCE's gradient only, m* Eq. 6's only, s* the pull's only:
  (log s - target) / s."""
  cos, labels = random_batch(5, shape=(16, 10))
  cos = np.maximum(cos, -0.85)  # theta + m < pi: on the curve cos(theta + m), no straight line
  target = numpy_spread_log_scale(cos, labels, margin, 1.1)
  np.testing.assert_allclose(losses.spread_log_scale(cos, labels, margin, 1.1), target, rtol=1e-5)
  logits = heads.margin_logits(cos, scale, margin)
  expected = (numpy_bce(np.asarray(logits), labels) + numpy_adaptive(cos, labels, scale, margin) +
              0.5 * (np.log(scale) - target)**2)
  np.testing.assert_allclose(losses.hml(cos, labels, scale, margin, logit_spread=1.1),
                             expected,
                             rtol=1e-4)
  grad_cos, grad_scale, grad_margin = _hml_gradients(cos, labels, scale, margin, logit_spread=1.1)
  np.testing.assert_allclose(grad_cos,
                             jax.grad(losses.hml_fixed)(jnp.asarray(cos), labels, scale, margin),
                             rtol=1e-6)
  np.testing.assert_allclose(grad_scale, (np.log(scale) - target) / scale, rtol=1e-4)
  step = 1e-5
  numeric = (numpy_adaptive(cos, labels, scale, margin + step) -
             numpy_adaptive(cos, labels, scale, margin - step)) / (2 * step)
  np.testing.assert_allclose(grad_margin, numeric, rtol=2e-3)


def test_spread_target_is_the_scale_of_the_wanted_logit_spread():
  """At s = exp(spread_log_scale) the margin logits' std is tau, and the pull on s vanishes."""
  cos, labels = random_batch(6, shape=(32, 20))
  for spread in (0.5, 1.1, 3.0):
    scale = float(jnp.exp(losses.spread_log_scale(cos, labels, 0.2, spread)))
    np.testing.assert_allclose(np.std(heads.margin_logits(cos, scale, 0.2)), spread, rtol=1e-4)
    pull = jax.grad(losses.scale_spread_loss, argnums=2)(cos, labels, jnp.float32(scale), 0.2,
                                                         spread)
    assert abs(float(pull)) < 1e-4


def test_likelihood_reading_trains_scale_by_the_bce():
  cos, labels = random_batch(7)
  _, grad_scale, grad_margin = _hml_gradients(cos, labels, adaptive_scale='likelihood')
  step = 1e-3
  numeric = (numpy_bce(np.asarray(heads.margin_logits(cos, 20.0 + step, 0.3)), labels) -
             numpy_bce(np.asarray(heads.margin_logits(cos, 20.0 - step, 0.3)), labels)) / (2 * step)
  np.testing.assert_allclose(grad_scale, numeric, rtol=2e-3)
  np.testing.assert_allclose(grad_margin,
                             jax.grad(losses.adaptive_loss, argnums=3)(jnp.asarray(cos), labels,
                                                                       20.0, jnp.float32(0.3)),
                             rtol=1e-6)


def test_unknown_adaptive_scale_names_the_choices():
  cos, labels = random_batch(8)
  with pytest.raises(ValueError, match=r"config.adaptive_scale='nope'.*'spread', 'balance'"):
    losses.hml(cos, labels, 20.0, 0.3, adaptive_scale='nope')


def test_registry_and_errors():
  assert methods.get_loss('an') is losses.assume_negative
  assert methods.get_method('hml').learns_scale_and_margin
  assert methods.get_method('hml').head == 'cosine' and methods.get_method('an').head == 'linear'
  with pytest.raises(ValueError, match="'nope'.*choose one of"):
    methods.get_loss('nope')
