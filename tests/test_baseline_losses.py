"""Each baseline loss against a NumPy transcription of its published formula (values and
gradients), on random inputs with a row without observed positives, an all-unknown column and
probabilities saturated at 0 and 1."""
import jax

from hml_jax.configs import default
import numpy as np
import pytest

from hml_jax import methods
from hml_jax.methods import losses
from hml_jax.state import steps
from hml_jax.training import loss_arguments


def log_p(x):
  return -np.logaddexp(0.0, -x)  # log sigmoid(x), exact in float64


def log_not_p(x):
  return -np.logaddexp(0.0, x)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


# Transcriptions of Cole et al.'s losses.py (neg_log exact), Zhou et al.'s and Ridnik et al.'s.
def ref_an(x, y):
  return np.mean(-y * log_p(x) - (1 - y) * log_not_p(x))


def ref_an_ls(x, y, ls_coef):
  positive = -(1 - ls_coef) * log_p(x) - ls_coef * log_not_p(x)
  negative = -(1 - ls_coef) * log_not_p(x) - ls_coef * log_p(x)
  return np.mean(np.where(y == 1, positive, negative))


def ref_wan(x, y):
  num_labels = y.shape[1]
  return np.mean(np.where(y == 1, -log_p(x), -log_not_p(x) / (num_labels - 1)))


def ref_epr(x, y, expected_num_pos):
  num_labels = y.shape[1]
  matrix = np.where(y == 1, -log_p(x), 0.0)
  regularizer = (sigmoid(x).sum(axis=1).mean(axis=0) - expected_num_pos)**2
  return matrix.sum() / matrix.size + regularizer / num_labels**2


def ref_em(x, y, alpha):
  p = sigmoid(x)
  entropy = -(p * log_p(x) + (1 - p) * log_not_p(x))
  return np.mean(np.where(y == 1, -log_p(x), -alpha * entropy))


def asl_weight(x, y, gamma_neg, gamma_pos, clip):
  xs_pos = sigmoid(x)
  xs_neg = np.minimum(1 - xs_pos + clip, 1.0)
  pt = xs_pos * y + xs_neg * (1 - y)
  return (1 - pt)**(gamma_pos * y + gamma_neg * (1 - y))


def ref_asl(x, y, gamma_neg, gamma_pos, clip, eps=1e-8, weight=None):
  """weight: the focusing weight held fixed (Ridnik et al. compute it without gradient)."""
  if weight is None:
    weight = asl_weight(x, y, gamma_neg, gamma_pos, clip)
  xs_pos = sigmoid(x)
  xs_neg = np.minimum(1 - xs_pos + clip, 1.0)
  loss = y * np.log(np.maximum(xs_pos, eps)) + (1 - y) * np.log(np.maximum(xs_neg, eps))
  return -np.mean(loss * weight)


CASES = {
    'an': (losses.assume_negative, ref_an, {}),
    'an_ls': (losses.assume_negative_label_smoothing, ref_an_ls, {
        'ls_coef': 0.1
    }),
    'wan': (losses.weak_assume_negative, ref_wan, {}),
    'epr': (losses.expected_positive_regularization, ref_epr, {
        'expected_num_pos': 2.9
    }),
    'em': (losses.entropy_maximization, ref_em, {
        'alpha': 0.2
    }),
    'asl': (losses.asymmetric_loss, ref_asl, {
        'gamma_neg': 4.0,
        'gamma_pos': 0.0,
        'clip': 0.05
    }),
    'asl_gamma_pos': (losses.asymmetric_loss, ref_asl, {
        'gamma_neg': 2.0,
        'gamma_pos': 1.0,
        'clip': 0.0
    }),
}


def inputs(seed, saturate=False):
  rng = np.random.RandomState(seed)
  logits = rng.normal(0, 2, size=(8, 7))
  labels = (rng.uniform(size=logits.shape) < 0.3).astype(np.float64)
  labels[0] = 0  # an image without an observed positive
  labels[:, 3] = 0  # a label never observed
  labels[1, 1] = 1
  if saturate:  # probabilities that float32 rounds to exactly 0 and 1
    logits[1, 1], logits[2, 2], logits[3, 4], logits[4, 5] = -60.0, 60.0, 45.0, -45.0
  return logits, labels


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('saturate', [False, True])
def test_value_matches_the_published_formula(name, saturate):
  loss, reference, hyperparameters = CASES[name]
  logits, labels = inputs(0, saturate)
  got = float(loss(logits.astype(np.float32), labels.astype(np.int32), **hyperparameters))
  np.testing.assert_allclose(got,
                             reference(logits, labels, **hyperparameters),
                             rtol=2e-5,
                             atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_gradient_matches_finite_differences_of_the_formula(name):
  loss, reference, hyperparameters = CASES[name]
  logits, labels = inputs(1)
  grad = np.asarray(
      jax.grad(lambda x: loss(x, labels, **hyperparameters))(logits.astype(np.float32)))
  if name.startswith('asl'):
    # ASL's focusing weight is a constant (no gradient through it), as in Ridnik et al.'s code.
    fixed = dict(hyperparameters, weight=asl_weight(logits, labels, **hyperparameters))
  else:
    fixed = hyperparameters
  step = 1e-6
  expected = np.zeros_like(logits)
  for index in np.ndindex(logits.shape):
    plus, minus = logits.copy(), logits.copy()
    plus[index] += step
    minus[index] -= step
    expected[index] = (reference(plus, labels, **fixed) -
                       reference(minus, labels, **fixed)) / (2 * step)
  np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_saturated_probabilities_give_finite_gradients(name):
  loss, _, hyperparameters = CASES[name]
  logits, labels = inputs(2, saturate=True)
  grad = jax.grad(lambda x: loss(x, labels, **hyperparameters))(logits.astype(np.float32))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_label_smoothing_and_weak_negatives_reduce_to_an():
  logits, labels = inputs(3)
  an = float(losses.assume_negative(logits, labels))
  assert float(losses.assume_negative_label_smoothing(logits, labels,
                                                      ls_coef=0.0)) == (pytest.approx(an, rel=1e-6))
  two_labels = labels[:, :2]
  assert float(losses.weak_assume_negative(logits[:, :2], two_labels)) == pytest.approx(float(
      losses.assume_negative(logits[:, :2], two_labels)),
                                                                                        rel=1e-6)


def test_every_linear_method_is_callable_on_logits_through_the_registry():
  logits, labels = inputs(4)
  for name, method in methods.METHODS.items():
    if method.head != 'linear':
      continue
    kwargs = {
        'ls_coef': 0.1,
        'expected_num_pos': 2.0,
        'alpha': 0.1,
        'gamma_neg': 4.0,
        'gamma_pos': 0.0,
        'clip': 0.05
    }
    arguments = {k: kwargs[k] for k in method.hyperparameters if k in kwargs}
    if method.schedule is not None:
      arguments['num_modified'] = 3
    if method.label_estimator:
      arguments['estimator_logits'] = -logits
    if method.pseudo_labels:
      arguments['beta'] = 0.02
    value = methods.get_loss(name)(logits, labels, **arguments)
    if method.updates_labels:
      value, modified = value
      assert modified.shape == labels.shape
    assert np.isfinite(float(value)), name


def ref_large_loss(x, y, num_modified, correct):
  """Transcription of Kim et al.'s loss_an + modification (BCE-with-logits, topk threshold)."""
  loss = -(y * log_p(x) + (1 - y) * log_not_p(x))
  corrected = -log_p(x)
  unobserved_loss = (y == 0) * loss
  if num_modified == 0:
    return loss.mean(), np.zeros_like(loss, bool)
  threshold = np.sort(unobserved_loss.ravel())[::-1][num_modified - 1]
  final = np.where(unobserved_loss < threshold, loss, corrected if correct else 0.0)
  return final.mean(), (unobserved_loss >= threshold) & (y == 0)


@pytest.mark.parametrize('correct', [False, True])
@pytest.mark.parametrize('num_modified', [0, 1, 5, 20])
def test_large_loss_matches_kim_et_al(correct, num_modified):
  logits, labels = inputs(5, saturate=True)
  value, modified = losses.large_loss(logits.astype(np.float32), labels, num_modified, correct)
  expected_value, expected_modified = ref_large_loss(logits, labels, num_modified, correct)
  np.testing.assert_allclose(float(value), expected_value, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(modified), expected_modified)
  assert not np.any(np.asarray(modified) & (labels == 1))  # observed positives are never touched
  if num_modified:
    assert np.asarray(modified).sum() == num_modified  # no ties in continuous losses
    grad = jax.grad(lambda x: losses.large_loss(x, labels, num_modified, correct)[0])(logits.astype(
        np.float32))
    # The selection is piecewise constant: differentiate the formula with it held fixed.
    unobserved_loss = (labels == 0) * -(labels * log_p(logits) + (1 - labels) * log_not_p(logits))
    selected = unobserved_loss >= np.sort(unobserved_loss.ravel())[::-1][num_modified - 1]

    def with_fixed_selection(z):
      loss = -(labels * log_p(z) + (1 - labels) * log_not_p(z))
      return np.where(selected, -log_p(z) if correct else 0.0, loss).mean()

    step, expected = 1e-6, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
      plus, minus = logits.copy(), logits.copy()
      plus[index] += step
      minus[index] -= step
      expected[index] = (with_fixed_selection(plus) - with_fixed_selection(minus)) / (2 * step)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-3, atol=1e-6)


def test_large_loss_schedule():
  config = default.get_config()  # Kim et al.'s default delta_rel_by_method
  config.loss = 'll_r'
  method = methods.get_method('ll_r')

  def schedule(epoch, entries):
    return loss_arguments.epoch_schedule(method, config, epoch, entries)

  assert schedule(1, 320) == {'num_modified': 0}  # epoch 1: plain AN
  assert schedule(2, 320) == {'num_modified': 2}  # ceil(320 * 0.005)
  assert schedule(4, 320) == {'num_modified': 5}  # ceil(320 * 0.015)
  permanent = losses.large_loss_schedule('ll_cp')
  ll_cp = config.delta_rel_by_method['ll_cp']
  assert permanent(2, 320, ll_cp) == permanent(9, 320, ll_cp) == {'num_modified': 1}
  config.delta_rel = 2.0
  # 1 - 0.02 - 0.02 leaves 0.04000000000000004 in float64: ceil(4.000000000000004) = 5, as in
  # their code, which accumulates the clean rate the same way.
  assert schedule(3, 100) == {'num_modified': 5}
  # Per-dataset values (configs/voc.py: Kim et al.'s reply) apply when delta_rel < 0.
  config.delta_rel = -1.0
  config.delta_rel_by_method = {'ll_r': 25.0, 'll_ct': 0.2, 'll_cp': 0.1}  # 25: exact in binary
  assert schedule(2, 100) == {'num_modified': 25}
  assert schedule(3, 100) == {'num_modified': 50}
  config.learning_rate_decay_epochs = (2,)  # the step schedule joins the loss's
  assert schedule(3, 100) == {'num_modified': 50, steps.LEARNING_RATE_FACTOR: 0.1}


def ref_role_parts(x, y, estimator, k):
  """Cole et al.'s loss_role, with the detached factors passed in as constants."""
  num_labels = y.shape[1]
  p, e = sigmoid(x), sigmoid(estimator)
  positives = np.where(y == 1, -log_p(x) - log_p(estimator), 0.0)

  def total(x_value, e_value, p_fixed, e_fixed):
    p_value, e_prob = sigmoid(x_value), sigmoid(e_value)
    pos = np.where(y == 1, -log_p(x_value) - log_p(e_value), 0.0)
    cross1 = e_fixed * -log_p(x_value) + (1 - e_fixed) * -log_not_p(x_value)
    cross2 = p_fixed * -log_p(e_value) + (1 - p_fixed) * -log_not_p(e_value)
    regularizer = 0.5 * (((p_value.sum(1).mean() - k)**2) + ((e_prob.sum(1).mean() - k)**2))
    return (0.5 * pos + 0.5 * (cross1 + cross2)).mean() + regularizer / num_labels**2

  del positives
  return total, p, e


def test_role_matches_cole_et_al_values_and_gradients():
  logits, labels = inputs(6, saturate=True)
  estimator = np.random.RandomState(7).normal(0, 1.5, size=logits.shape)
  total, p, e = ref_role_parts(logits, labels, estimator, 2.9)
  value = losses.role(logits.astype(np.float32), labels, estimator.astype(np.float32), 2.9)
  np.testing.assert_allclose(float(value), total(logits, estimator, p, e), rtol=2e-5)
  grad_logits, grad_estimator = jax.grad(losses.role,
                                         argnums=(0, 2))(logits.astype(np.float32), labels,
                                                         estimator.astype(np.float32), 2.9)
  step = 1e-6
  for argument, grad in ((0, grad_logits), (1, grad_estimator)):
    expected = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
      values = []
      for sign in (1, -1):
        x, est = logits.copy(), estimator.copy()
        (x if argument == 0 else est)[index] += sign * step
        values.append(total(x, est, p, e))  # detached factors stay at the current point
      expected[index] = (values[0] - values[1]) / (2 * step)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-3, atol=1e-6)


def test_role_estimator_init_is_cole_et_al():
  labels = (np.random.RandomState(8).uniform(size=(50, 6)) < 0.3).astype(np.int32)
  init = np.asarray(losses.role_estimator_init(labels, jax.random.key(0)))
  np.testing.assert_allclose(init[labels == 1], np.log(0.995 / 0.005), rtol=1e-6)
  bound = np.log(0.6 / 0.4)
  assert np.all(np.abs(init[labels == 0]) <= bound) and init[labels == 0].std() > bound / 3


def ref_em_apl(x, state, alpha, beta):
  """Zhou et al.'s loss_EM_APL with exact logs: -log p, -alpha H(p), beta BCE(p; -state)."""
  p = sigmoid(x)
  entropy = -(p * log_p(x) + (1 - p) * log_not_p(x))
  soft = -state
  pseudo = beta * (soft * -log_p(x) + (1 - soft) * -log_not_p(x))
  return np.mean(np.where(state == 1, -log_p(x), np.where(state == 0, -alpha * entropy, pseudo)))


def test_em_apl_loss_matches_zhou_et_al():
  logits, labels = inputs(9, saturate=True)
  state = labels.copy()
  state[2, 0], state[5, 6], state[6, 3] = -0.1, -0.03, -0.5  # pseudo-labels
  value = losses.entropy_maximization_pseudo_labels(logits.astype(np.float32), state, 0.2, 0.02)
  np.testing.assert_allclose(float(value), ref_em_apl(logits, state, 0.2, 0.02), rtol=2e-5)
  grad = jax.grad(losses.entropy_maximization_pseudo_labels)(logits.astype(np.float32), state, 0.2,
                                                             0.02)
  step, expected = 1e-6, np.zeros_like(logits)
  smooth = logits.copy()
  for index in np.ndindex(logits.shape):
    plus, minus = smooth.copy(), smooth.copy()
    plus[index] += step
    minus[index] -= step
    expected[index] = (ref_em_apl(plus, state, 0.2, 0.02) -
                       ref_em_apl(minus, state, 0.2, 0.02)) / (2 * step)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=2e-3, atol=1e-6)
  # Without pseudo-labels it is EM.
  np.testing.assert_allclose(float(
      losses.entropy_maximization_pseudo_labels(logits, labels, 0.2, 0.02)),
                             float(losses.entropy_maximization(logits, labels, alpha=0.2)),
                             rtol=1e-6)


def test_asymmetric_pseudo_labels_is_zhou_et_al():
  rng = np.random.RandomState(10)
  state = (rng.uniform(size=(40, 4)) < 0.2).astype(np.float32)
  probabilities = rng.uniform(size=state.shape).astype(np.float32)
  unknown = (state == 0).sum(0)
  first = losses.asymmetric_pseudo_labels(state,
                                          probabilities,
                                          unknown,
                                          num_epochs=10,
                                          warmup_epoch=5)
  for label in range(4):
    count = int(0.9 * unknown[label] / 5)
    candidates = np.nonzero(state[:, label] == 0)[0]
    lowest = candidates[np.argsort(probabilities[candidates, label])[:count]]
    np.testing.assert_allclose(first[lowest, label], -probabilities[lowest, label])
    assert np.sum(first[:, label] < 0) == count
  np.testing.assert_array_equal(first[state == 1], 1)  # observed positives stay
  # A second pass adds new ones and never revises the old.
  second = losses.asymmetric_pseudo_labels(first, probabilities, unknown, 10, 5)
  np.testing.assert_array_equal(second[first != 0], first[first != 0])
  assert np.sum(second < 0) == 2 * np.sum(first < 0)


def test_large_loss_never_modifies_observed_positives_even_past_every_unobserved_entry():
  logits, labels = inputs(11)
  unobserved = int((labels == 0).sum())
  for correct in (False, True):
    value, modified = losses.large_loss(logits.astype(np.float32), labels, unobserved + 7, correct)
    positives = -log_p(logits)
    expected = np.where(labels == 1, positives, positives if correct else 0.0).mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(modified), labels == 0)


def test_pseudo_labels_of_zero_probability_are_not_mistaken_for_unknown():
  state = np.zeros((5, 1), np.float32)
  probabilities = np.zeros((5, 1), np.float32)
  new = losses.asymmetric_pseudo_labels(state, probabilities, np.array([5]), 2, 1, 0.5)
  assert np.sum(new < 0) == 2
