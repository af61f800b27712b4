"""hml_jax.models.initializers: bitwise jax.nn.initializers' values, drawn flat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax.methods import losses
from hml_jax.models import initializers

SHAPES = [(3, 3, 2, 2), (5, 2)]  # shaped draws compile slowly (the reason for the module)


@pytest.mark.parametrize('distribution', ['truncated_normal', 'normal', 'uniform'])
def test_variance_scaling_is_jax_own_bitwise_eager_and_jitted(distribution):
  """Eager (as flax's model.init runs) and under jax.jit (as create_train_state runs it): the
  optimization barrier keeps XLA from fusing the scaling into the draw, which would round
  differently."""
  for mode in ('fan_in', 'fan_out', 'fan_avg'):
    ours = initializers.variance_scaling(2.0, mode, distribution)
    reference = jax.nn.initializers.variance_scaling(2.0, mode, distribution)
    for index, shape in enumerate(SHAPES):
      key = jax.random.key(index)
      expected = reference(key, shape)
      for got in (ours(key, shape), jax.jit(ours, static_argnums=1)(key, shape)):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
  got = ours(jax.random.key(0), SHAPES[1], jnp.bfloat16)
  expected = reference(jax.random.key(0), SHAPES[1], jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_lecun_normal_and_the_role_estimator_are_jax_own_draws():
  key = jax.random.key(3)
  np.testing.assert_array_equal(initializers.lecun_normal()(key, (3, 3, 2, 2)),
                                jax.nn.initializers.lecun_normal()(key, (3, 3, 2, 2)))
  observed = (np.random.RandomState(0).uniform(size=(12, 5)) < 0.2).astype(np.float32)
  bound = float(np.log(0.6 / 0.4))
  expected = jnp.where(observed == 1, jnp.float32(np.log(0.995 / 0.005)),
                       jax.random.uniform(key, observed.shape, jnp.float32, -bound, bound))
  np.testing.assert_array_equal(losses.role_estimator_init(observed, key), expected)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="mode 'fan_max'"):
    initializers.variance_scaling(1.0, 'fan_max', 'normal')
  with pytest.raises(ValueError, match="distribution 'cauchy'"):
    initializers.variance_scaling(1.0, 'fan_in', 'cauchy')
  with pytest.raises(ValueError, match='at least 2 dimensions'):
    initializers.lecun_normal()(jax.random.key(0), (5,))


@pytest.mark.parametrize(
    'model_name,head',
    [pytest.param('resnet_small', 'cosine', marks=pytest.mark.slow), ('resnet_tiny', 'linear')])
def test_compiled_model_init_is_the_eager_one_bitwise(model_name, head):
  """create_train_state's compiled init gives the parameters an eager model.init gives (the
  values every run before the compiled init started from)."""
  from hml_jax import models  # pylint: disable=g-import-not-at-top
  from hml_jax.state import train_state
  model = models.create_model(model_name, head, 20)
  compiled = train_state.initial_variables(model, jax.random.key(4), (32, 32, 3))
  eager = model.init(jax.random.key(4), jnp.zeros((1, 32, 32, 3)), train=False)
  assert jax.tree_util.tree_structure(compiled) == jax.tree_util.tree_structure(eager)
  for path, leaf in jax.tree_util.tree_leaves_with_path(eager):
    np.testing.assert_array_equal(dict(jax.tree_util.tree_leaves_with_path(compiled))[path],
                                  leaf,
                                  err_msg=jax.tree_util.keystr(path))
