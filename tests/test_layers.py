"""hml_jax.models.layers: the matmul forms (on channel-major activations) equal XLA's native
convolution (channel-last), values and gradients; BatchNorm equals flax's on either channel axis."""
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from hml_jax import models
from hml_jax.models import initializers
from hml_jax.models import layers


def random_normal(key, shape):
  """jax.random.normal(key, shape), drawn flat: the same numbers, compiled in a fraction of the
  time (hml_jax/models/initializers.py)."""
  return initializers.flat_draw(jax.random.normal, key, shape)


def random_uniform(key, shape):
  return initializers.flat_draw(jax.random.uniform, key, shape)


def native(x, kernel, strides, padding):
  return lax.conv_general_dilated(x,
                                  kernel,
                                  strides,
                                  padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def channel_major(x):
  """(N, H, W, C) -> (C, N, H, W), the layout of the 'matmul' implementation."""
  return jnp.transpose(x, (3, 0, 1, 2))


def channel_last(x):
  return jnp.transpose(x, (1, 2, 3, 0))


def matmul_convolve(x, kernel, strides, padding):
  """The 'matmul' implementation on channel-last x, for comparing with native()."""
  return channel_last(layers.convolve(channel_major(x), kernel, strides, padding, 'matmul'))


def random_inputs(shape, kernel_shape, seed=0):
  x = random_normal(jax.random.key(seed), shape)
  kernel = random_normal(jax.random.key(seed + 1), kernel_shape) / np.sqrt(np.prod(
      kernel_shape[:3]))
  return x, kernel


# (input shape, kernel shape, strides, padding): every kind of convolution of a ResNet (1x1 as a
# channel matmul, the others as patch_matmul), on maps down to 2x2.
CASES = [
    ((2, 6, 6, 8), (1, 1, 8, 16), (1, 1), ((0, 0), (0, 0))),  # 1x1, more out than in
    ((2, 6, 6, 16), (1, 1, 16, 4), (1, 1), ((0, 0), (0, 0))),  # 1x1, fewer out than in
    ((2, 7, 7, 8), (1, 1, 8, 12), (2, 2), 'VALID'),  # strided 1x1 (downsample)
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),  # 3x3 on a 2x2 map
    ((2, 4, 4, 8), (3, 3, 8, 6), (2, 2), ((1, 1), (1, 1))),  # strided 3x3 on a 4x4 map
    ((2, 3, 3, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),  # odd sizes
    ((2, 9, 9, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1))),  # strided 3x3, odd map
    ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),  # the 7x7/2 stem
]


@pytest.mark.parametrize('shape,kernel_shape,strides,padding', CASES)
def test_matmul_equals_native_values_and_gradients(shape, kernel_shape, strides, padding):
  x, kernel = random_inputs(shape, kernel_shape)
  # Jitted: one compiled program per function instead of one per operation (seconds each).
  expected = jax.jit(native, static_argnums=(2, 3))(x, kernel, strides, padding)
  result = jax.jit(matmul_convolve, static_argnums=(2, 3))(x, kernel, strides, padding)
  np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)

  weights = random_normal(jax.random.key(7), expected.shape)

  def loss(function):
    return lambda x, kernel: jnp.sum(function(x, kernel) * weights)

  def gradients(function):
    return jax.jit(jax.grad(loss(lambda x, k: function(x, k, strides, padding)), (0, 1)))(x, kernel)

  expected_grads = gradients(native)
  grads = gradients(matmul_convolve)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('in_channels,out_channels', [(3, 5), (5, 3)])
def test_channel_matmul_backward_is_the_analytic_gradient(in_channels, out_channels):
  """The hand-written backward pass against NumPy, channel-major: y = W^T x, dx = W dy,
  dW = x dy^T over all pixels."""
  rng = np.random.RandomState(0)
  x = rng.randn(in_channels, 2, 3, 4).astype(np.float32)
  matrix = rng.randn(in_channels, out_channels).astype(np.float32)
  output_gradient = rng.randn(out_channels, 2, 3, 4).astype(np.float32)
  result, vjp = jax.vjp(layers.channel_matmul, x, matrix)
  np.testing.assert_allclose(result, np.einsum('io,i...->o...', matrix, x), rtol=1e-5, atol=1e-5)
  input_gradient, matrix_gradient = vjp(output_gradient)
  np.testing.assert_allclose(input_gradient,
                             np.einsum('io,o...->i...', matrix, output_gradient),
                             rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(
      matrix_gradient,
      x.reshape(in_channels, -1) @ output_gradient.reshape(out_channels, -1).T,
      rtol=1e-5,
      atol=1e-5)


def test_conv_module_has_flax_conv_parameters_and_outputs():
  """The same parameters (shapes included) as nn.Conv under both implementations, and the same
  outputs, each in its own layout."""
  x = random_normal(jax.random.key(0), (2, 5, 5, 4))
  for kernel_size, strides, padding in [((1, 1), (1, 1), 'VALID'), ((3, 3), (2, 2), ((1, 1),) * 2)]:
    flax_conv = nn.Conv(6, kernel_size, strides, padding, use_bias=False)
    flax_variables = flax_conv.init(jax.random.key(1), x)
    expected = flax_conv.apply(flax_variables, x)
    for implementation, to_layout, from_layout in (('matmul', channel_major, channel_last),
                                                   ('native', lambda x: x, lambda x: x)):
      ours = layers.Conv(6, kernel_size, strides, padding, convolutions=implementation)
      variables = ours.init(jax.random.key(1), to_layout(x))
      assert jax.tree_util.tree_map(jnp.shape,
                                    variables) == jax.tree_util.tree_map(jnp.shape, flax_variables)
      np.testing.assert_allclose(from_layout(ours.apply(flax_variables, to_layout(x))),
                                 expected,
                                 rtol=1e-5,
                                 atol=1e-5)


@pytest.mark.parametrize('shape,kernel_shape,strides,padding', CASES)
def test_forward_with_a_given_matrix_is_the_matmul_convolution(shape, kernel_shape, strides,
                                                               padding):
  """convolve_forward with forward_matrix(kernel), the eval step's path, computes exactly what
  convolve computes (the same matmul, its transpose done beforehand)."""
  x, kernel = random_inputs(shape, kernel_shape)
  x = channel_major(x)
  expected = layers.convolve(x, kernel, strides, padding, 'matmul')
  matrix = layers.forward_matrix(kernel)
  assert matrix.shape == (kernel_shape[3], np.prod(kernel_shape[:3]))
  result = layers.convolve_forward(x, matrix, kernel_shape[:2], strides, padding)
  np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'shape,kernel_shape,padding',
    [
        ((2, 6, 6, 8), (3, 3, 8, 16), ((1, 1), (1, 1))),  # ResNet's 3x3, 'same'
        ((2, 2, 2, 8), (3, 3, 8, 4), ((1, 1), (1, 1))),  # 2x2 map: corner taps see only padding
        ((1, 5, 7, 3), (3, 3, 3, 5), 'VALID'),  # no padding, a non-square map
        ((1, 6, 5, 4), (5, 5, 4, 2), ((2, 2), (2, 2))),  # 5x5
        ((2, 5, 6, 4), (3, 2, 4, 3), ((0, 2), (1, 0))),  # uneven kernel and padding
        ((1, 2, 2, 4), (5, 5, 4, 3), ((3, 3), (3, 3))),  # padding wider than the kernel's reach
    ])
def test_shifted_products_is_the_convolution(shape, kernel_shape, padding):
  """shifted_products (stride 1, no patch matrix) against XLA's own convolution."""
  x, kernel = random_inputs(shape, kernel_shape)
  explicit = ((0, 0), (0, 0)) if padding == 'VALID' else padding
  expected = lax.conv_general_dilated(x,
                                      kernel, (1, 1),
                                      explicit,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  result = layers.shifted_products(channel_major(x), layers.forward_matrix(kernel),
                                   kernel_shape[:2], explicit)
  assert result.shape == channel_major(expected).shape
  np.testing.assert_allclose(channel_last(result), expected, rtol=1e-5, atol=1e-5)
  # convolve_forward takes this path for a stride-1 convolution over few channels.
  np.testing.assert_allclose(
      layers.convolve_forward(channel_major(x), layers.forward_matrix(kernel), kernel_shape[:2],
                              (1, 1), padding), result)


def test_shifted_products_rejects_a_matrix_of_another_kernel():
  x = jnp.zeros((4, 1, 5, 5))
  with pytest.raises(ValueError, match=r'\(3, 3\) kernel over 4 channels'):
    layers.shifted_products(x, jnp.zeros((8, 9 * 3)), (3, 3), ((1, 1), (1, 1)))


@pytest.mark.slow
def test_resnet_eval_with_forward_matrices_gives_the_same_features(monkeypatch):
  """A whole ResNet in evaluation with the FORWARD_MATRICES collection (one matrix per Conv, at
  the kernels' paths) gives the features of the plain forward pass."""
  images = random_uniform(jax.random.key(0), (4, 32, 32, 3))
  network = models.get_backbone('resnet18', convolutions='matmul')
  variables = network.init(jax.random.key(1), images)
  matrices = layers.forward_matrices(variables['params'])
  kernels = [
      path for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
      if leaf.ndim == 4
  ]
  assert len(jax.tree_util.tree_leaves(matrices)) == len(kernels) == 20
  assert matrices['layer2_0']['downsample_conv']['matrix'].shape == (128, 64)
  expected = network.apply(variables, images)
  with monkeypatch.context() as patch:  # every Conv takes its matrix: none transposes a kernel
    patch.setattr(layers, 'convolve', lambda *arguments: pytest.fail('a kernel was transposed'))
    result = network.apply({**variables, layers.FORWARD_MATRICES: matrices}, images)
  # (1e-5: the stride-1 3x3 convolutions sum their taps in another order, shifted_products.)
  np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
  # The matrices are what the forward pass multiplies by: changed matrices change the features.
  doubled = jax.tree_util.tree_map(lambda matrix: 2 * matrix, matrices)
  assert not np.allclose(network.apply({
      **variables, layers.FORWARD_MATRICES: doubled
  }, images), expected)


def narrow_resnet(convolutions):
  """Every kind of layer of ResNet-50 (the 7x7/2 stem, the max-pool, bottlenecks with strided
  3x3 and downsampling 1x1 convolutions), narrow and one block per stage."""
  return models.ResNet(stage_sizes=(1, 1, 1, 1),
                       block=models.Bottleneck,
                       widths=(4, 8, 8, 16),
                       stem_width=8,
                       convolutions=convolutions)


@pytest.mark.slow
def test_resnet_is_the_same_network_under_every_implementation():
  """A bottleneck ResNet at 64x64 (maps from 32x32 down to 2x2): same parameters, same features,
  same gradients. (A batch of 8: BatchNorm over very few values per channel amplifies
  float rounding, which is not what this compares.)"""
  images = random_uniform(jax.random.key(0), (8, 64, 64, 3))
  networks = {name: narrow_resnet(name) for name in ('native', 'matmul')}
  variables = jax.jit(networks['native'].init)(jax.random.key(1), images)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      jax.eval_shape(networks['matmul'].init, jax.random.key(1), images))

  def loss(network):

    def function(params):
      features, _ = network.apply({
          'params': params,
          'batch_stats': variables['batch_stats']
      },
                                  images,
                                  train=True,
                                  mutable=['batch_stats'])
      return jnp.sum(features**2), features

    return function

  results = {
      name: jax.jit(jax.value_and_grad(loss(network), has_aux=True))(variables['params'])
      for name, network in networks.items()
  }
  (_, native_features), native_grads = results['native']
  (_, matmul_features), matmul_grads = results['matmul']
  np.testing.assert_allclose(matmul_features, native_features, rtol=1e-4, atol=1e-5)
  for path, grad in jax.tree_util.tree_leaves_with_path(matmul_grads):
    expected = dict(jax.tree_util.tree_leaves_with_path(native_grads))[path]
    # Rounding differs in the order of the sums: compare against each gradient's own scale.
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(grad - expected))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_half_precision_runs_in_bfloat16():
  x, kernel = random_inputs((2, 4, 4, 8), (1, 1, 8, 16))
  result = matmul_convolve(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1), 'VALID')
  assert result.dtype == jnp.bfloat16
  np.testing.assert_allclose(result.astype(np.float32),
                             native(x, kernel, (1, 1), 'VALID'),
                             rtol=5e-2,
                             atol=5e-2)
  grads = jax.grad(lambda k: jnp.sum(
      matmul_convolve(x.astype(jnp.bfloat16), k, (1, 1), 'VALID').astype(jnp.float32)))(
          kernel.astype(jnp.bfloat16))
  assert grads.dtype == jnp.bfloat16


def test_auto_and_unknown_implementations():
  assert layers.resolve_convolutions('auto') == ('matmul'
                                                 if jax.default_backend() == 'cpu' else 'native')
  with pytest.raises(ValueError, match=r"'fast'.*config.convolutions"):
    layers.resolve_convolutions('fast')
  with pytest.raises(ValueError, match='no bias'):
    layers.Conv(4, (1, 1), use_bias=True).init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


@pytest.mark.parametrize('axis', [-1, 0])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_equals_flax_batch_norm(dtype, axis):
  """Same variables, outputs, running statistics and gradients as flax.linen.BatchNorm, in
  training and in evaluation mode, with the channels last (as flax) or first (as the 'matmul'
  implementation's activations)."""
  x = (random_normal(jax.random.key(1), (4, 5, 5, 6)) * 3 + 1).astype(dtype)
  settings = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
  ours, theirs = layers.BatchNorm(axis=axis, **settings), nn.BatchNorm(axis=axis, **settings)
  if axis == 0:
    x = channel_major(x)
  variables = theirs.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree_util.tree_structure(ours.init(jax.random.key(0),
                                                x)) == (jax.tree_util.tree_structure(variables))
  variables = {
      'params': {
          'scale': jnp.linspace(0.5, 2.0, 6),
          'bias': jnp.linspace(-1, 1, 6)
      },
      'batch_stats': {
          'mean': jnp.linspace(0, 1, 6),
          'var': jnp.linspace(1, 3, 6)
      }
  }
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  y_ours, stats_ours = ours.apply(variables, x, mutable=['batch_stats'])
  y_theirs, stats_theirs = theirs.apply(variables,
                                        x,
                                        use_running_average=False,
                                        mutable=['batch_stats'])
  assert y_ours.dtype == dtype
  np.testing.assert_allclose(y_ours.astype(np.float32),
                             y_theirs.astype(np.float32),
                             rtol=tolerance,
                             atol=tolerance)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(stats_ours['batch_stats'][key],
                               stats_theirs['batch_stats'][key],
                               rtol=1e-5,
                               atol=1e-6)
  evaluation = layers.BatchNorm(use_running_average=True, axis=axis, **settings).apply(variables, x)
  np.testing.assert_allclose(evaluation.astype(np.float32),
                             theirs.apply(variables, x,
                                          use_running_average=True).astype(np.float32),
                             rtol=tolerance,
                             atol=tolerance)

  weights = random_normal(jax.random.key(3), x.shape)

  def loss(apply):
    return lambda params, x: jnp.sum(apply(params, x).astype(jnp.float32) * weights)

  grads_ours = jax.grad(
      loss(lambda p, x: ours.apply(
          {
              'params': p,
              'batch_stats': variables['batch_stats']
          }, x, mutable=['batch_stats'])[0]), (0, 1))(variables['params'], x)
  grads_theirs = jax.grad(
      loss(lambda p, x: theirs.apply({
          'params': p,
          'batch_stats': variables['batch_stats']
      },
                                     x,
                                     use_running_average=False,
                                     mutable=['batch_stats'])[0]), (0, 1))(variables['params'], x)
  for ours_leaf, theirs_leaf in zip(jax.tree_util.tree_leaves(grads_ours),
                                    jax.tree_util.tree_leaves(grads_theirs)):
    assert ours_leaf.dtype == theirs_leaf.dtype
    scale = float(jnp.max(jnp.abs(theirs_leaf.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(
        (ours_leaf - theirs_leaf).astype(jnp.float32)))) <= (tolerance * scale)


@pytest.mark.parametrize('axis', [-1, 0])
def test_batch_norm_gradient_is_the_analytic_one(axis):
  """The hand-written backward pass against central finite differences of the loss along random
  directions (float32, so a loose tolerance)."""
  x = random_normal(jax.random.key(0), (3, 2, 2, 4) if axis == -1 else (4, 3, 2, 2))
  scale, bias = jnp.array([1.0, 2.0, 0.5, -1.0]), jnp.array([0.1, 0.0, -0.2, 0.3])
  weights = random_normal(jax.random.key(1), x.shape)

  def loss(x, scale, bias):
    return jnp.sum(layers.batch_norm_training(x, scale, bias, 1e-5, jnp.float32, axis)[0] * weights)

  grads = jax.grad(loss, (0, 1, 2))(x, scale, bias)
  for argument, direction_seed in ((0, 5), (1, 6), (2, 7)):
    arguments = [x, scale, bias]
    direction = random_normal(jax.random.key(direction_seed), arguments[argument].shape)
    step = 1e-2
    plus, minus = list(arguments), list(arguments)
    plus[argument] = arguments[argument] + step * direction
    minus[argument] = arguments[argument] - step * direction
    numeric = (loss(*plus) - loss(*minus)) / (2 * step)
    analytic = jnp.sum(grads[argument] * direction)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)
