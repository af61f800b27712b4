"""The ResNets' layers, written so that XLA's CPU backend runs them fast: Conv and BatchNorm.

`Conv` has flax.linen.Conv's parameter (no bias, a 'kernel' of shape
(kernel_height, kernel_width, in_channels, out_channels)), so parameters, checkpoints and
imported torchvision weights are the same whichever `convolutions` computes it. The
choice also fixes the layout of the activations between layers (`channel_axis`):

- 'native': lax.conv_general_dilated everywhere (what nn.Conv does), on channel-last (N, H, W, C)
  activations. Best on GPU and TPU, whose convolution libraries are well tuned.
- 'matmul': what profiling the ResNet-50 train step on CPU showed to be faster (every number and
  every attempt is in docs/history.md), on channel-major (C, N, H, W) activations:
  * 1x1 convolutions (two thirds of ResNet-50's) are a matmul over the channel axis,
    `channel_matmul`, with a hand-written backward pass. Channel-major, all three of its matmuls
    (forward, input gradient, kernel gradient) have a row-major left operand, the form XLA hands
    to YNNPACK; channel-last, the kernel gradients ran in Eigen, a third slower (attempt 15).
  * Every other convolution (3x3, the 7x7 stem) is im2col + that matmul, `patch_matmul`. On
    small maps (ResNet-50's last stage is 2x2 at 64x64 inputs) XLA rewrites a native
    convolution with the kernel and the image swapped, a form its fast path does not take
    (three fifths of the step at 64x64); on larger maps the GEMM on patches is as fast as the
    native convolution with glibc's malloc and 8% faster with tcmalloc.
  Evaluation (`convolve_forward`) computes the stride-1 3x3 convolutions of the first three
  stages without the patch matrix (`shifted_products`): faster there, not in training.
  The images are transposed once into this layout (`from_images`) and the pooled features back
  (`global_average`); `max_pool` pools either layout.
- 'auto': 'matmul' on CPU, 'native' elsewhere.

`BatchNorm` is flax.linen.BatchNorm as the ResNets use it (the same parameters, statistics and
outputs), over the channel axis of either layout, with its training-mode backward pass written
by hand: two passes over the activations (one reduction, one elementwise) where automatic
differentiation of the statistics left XLA with more; docs/history.md has the
measurement.
"""
import functools
from typing import Any, Mapping, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from hml_jax.models import initializers
from hml_jax.runtime import errors

CONVOLUTIONS = ('auto', 'native', 'matmul')

# The flax variable collection of the matrices that 'matmul' convolutions multiply by in their
# forward pass: each kernel (kh, kw, in, out) as (out, kh * kw * in), its transpose. A forward
# pass given them (the eval step, steps.EvalFunction) skips transposing every kernel on every
# call, about a tenth of ResNet-50's evaluation at 64x64 on CPU (docs/history.md, 16).
FORWARD_MATRICES = 'forward_matrices'

Padding = Union[str, Sequence[Tuple[int, int]]]


def resolve_convolutions(convolutions: str) -> str:
  """'auto' -> 'matmul' on CPU, 'native' on GPU and TPU; checks the name."""
  if convolutions not in CONVOLUTIONS:
    raise errors.InvalidInputError(f'Unknown convolutions {convolutions!r} '
                                   f'(config.convolutions); choose one of {list(CONVOLUTIONS)}.')
  if convolutions == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'native'
  return convolutions


def channel_axis(convolutions: str) -> int:
  """Where the channels of the activations are under these convolutions: 'matmul' carries
  them channel-major, (C, N, H, W), and 'native' channel-last, (N, H, W, C)."""
  return 0 if resolve_convolutions(convolutions) == 'matmul' else -1


def from_images(images, convolutions: str):
  """Images (N, H, W, C) -> activations in the layout of `convolutions`."""
  if channel_axis(convolutions) == 0:
    return jnp.transpose(images, (3, 0, 1, 2))
  return images


def max_pool(x, window: int, stride: int, padding: int, convolutions: str):
  """Max-pooling over the spatial axes of activations in the layout of `convolutions`, padded
  with -inf (as flax.linen.max_pool and torch's MaxPool2d)."""
  if channel_axis(convolutions) == 0:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, window, window), (1, 1, stride, stride),
                             ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  return nn.max_pool(x, (window, window),
                     strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def global_average(x, convolutions: str):
  """The mean over the spatial axes: activations in the layout of `convolutions` -> (N, C)."""
  if channel_axis(convolutions) == 0:
    return jnp.mean(x, axis=(2, 3)).T
  return jnp.mean(x, axis=(1, 2))


def _contract_rows(rows, x):
  """rows (out, in) @ x (in, ...) -> (out, ...), over x's leading (channel) axis."""
  pixels = x.reshape(x.shape[0], -1)
  return (rows @ pixels).reshape((rows.shape[0],) + x.shape[1:])


def _contract_channels(x, matrix):
  """x (in, ...) and matrix (in, out) -> (out, ...): matrix^T @ x over the leading axis.

  Activations are channel-major so that all three matmuls of a convolution take the form that
  YNNPACK runs (a row-major left operand): the forward pass matrix^T (out, in) @ x (in, pixels),
  the input gradient matrix (in, out) @ dy (out, pixels), and the kernel gradient x (in, pixels)
  @ dy^T. Channel-last, the kernel gradient x^T @ dy contracts the left operand's rows, which
  YNNPACK does not take, and XLA ran it in Eigen at about two thirds of the speed
  (docs/history.md, attempt 15). The barrier keeps XLA from folding the small
  transpose of the matrix back into the matmul, which would give the same untaken form.
  """
  return _contract_rows(lax.optimization_barrier(matrix.T), x)


@jax.custom_vjp
def channel_matmul(x, matrix):
  """x (in_channels, ...) contracted with matrix (in_channels, out_channels) ->
  (out_channels, ...): a 1x1 convolution of channel-major activations, with a hand-written
  backward pass (see _contract_channels)."""
  return _contract_channels(x, matrix)


def _channel_matmul_forward(x, matrix):
  return _contract_channels(x, matrix), (x, matrix)


def _channel_matmul_backward(residuals, output_gradient):
  x, matrix = residuals
  gradient_pixels = output_gradient.reshape(output_gradient.shape[0], -1)  # (out, pixels)
  input_gradient = (matrix @ gradient_pixels).reshape(x.shape)  # (in, pixels)
  matrix_gradient = lax.dot_general(x.reshape(x.shape[0], -1), gradient_pixels,
                                    (((1,), (1,)), ((), ())))  # (in, out)
  return input_gradient, matrix_gradient.astype(matrix.dtype)


channel_matmul.defvjp(_channel_matmul_forward, _channel_matmul_backward)


def _explicit_padding(padding: Padding):
  """'VALID' or ((top, bottom), (left, right)) -> the pairs, as a hashable tuple."""
  if isinstance(padding, str):
    if padding.upper() == 'VALID':
      return ((0, 0), (0, 0))
    raise ValueError(f'Padding {padding!r}: give explicit ((top, bottom), (left, right)) '
                     "pairs or 'VALID'.")
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def im2col(x, kernel_size: Tuple[int, int], strides: Tuple[int, int], padding: Padding):
  """Patches of a convolution of channel-major activations: x (C, N, H, W) ->
  (kh * kw * C, N, out_H, out_W), ordered as a (kh, kw, C, out) kernel reshaped to
  (kh * kw * C, out)."""
  kernel_height, kernel_width = kernel_size
  stride_height, stride_width = strides
  padding = _explicit_padding(padding)
  if any(pair != (0, 0) for pair in padding):
    x = jnp.pad(x, ((0, 0), (0, 0)) + padding)
  height, width = x.shape[2:]
  out_height = (height - kernel_height) // stride_height + 1
  out_width = (width - kernel_width) // stride_width + 1
  rows = [
      x[:, :, i:i + stride_height * (out_height - 1) + 1:stride_height,
        j:j + stride_width * (out_width - 1) + 1:stride_width]
      for i in range(kernel_height)
      for j in range(kernel_width)
  ]
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def patch_matmul(x, kernel, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  """A convolution as kernel^T @ im2col(x): x (in, N, H, W), kernel (kh, kw, in, out) ->
  (out, N, out_H, out_W). Its backward pass keeps x, not the kh * kw times larger patches, and
  builds them again: memory as a native convolution's, at the cost of one more copy."""
  kernel_height, kernel_width, _, out_channels = kernel.shape
  patches = im2col(x, (kernel_height, kernel_width), strides, padding)
  return _contract_channels(patches, kernel.reshape(-1, out_channels))


def _patch_matmul_forward(x, kernel, strides, padding):
  return patch_matmul(x, kernel, strides, padding), (x, kernel)


def _patch_matmul_backward(strides, padding, residuals, output_gradient):
  x, kernel = residuals
  kernel_height, kernel_width, _, out_channels = kernel.shape
  patches, patches_backward = jax.vjp(
      lambda x: im2col(x, (kernel_height, kernel_width), strides, padding), x)
  patches_gradient, matrix_gradient = _channel_matmul_backward(
      (patches, kernel.reshape(-1, out_channels)), output_gradient)
  (input_gradient,) = patches_backward(patches_gradient)  # col2im: the patches' overlaps summed
  return input_gradient, matrix_gradient.reshape(kernel.shape)


patch_matmul.defvjp(_patch_matmul_forward, _patch_matmul_backward)


def _subsample(x, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  """What a 1x1 convolution of channel-major x (C, N, H, W) sees: x padded, then strided."""
  if any(pair != (0, 0) for pair in padding):
    x = jnp.pad(x, ((0, 0), (0, 0)) + padding)
  return x[:, :, ::strides[0], ::strides[1]]


def forward_matrix(kernel):
  """A kernel (kh, kw, in, out) -> (out, kh * kw * in): what a 'matmul' convolution multiplies
  its im2col patches by (channel_matmul and patch_matmul transpose it on every call)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def forward_matrices(params):
  """The FORWARD_MATRICES collection for a model's params: {..., 'conv1': {'matrix': (out,
  kh * kw * in)}} at every Conv (every 4-D 'kernel'), the same tree paths as the kernels."""
  matrices = {}
  for name, value in params.items():
    if name == 'kernel' and getattr(value, 'ndim', 0) == 4:
      matrices['matrix'] = forward_matrix(value)
    elif isinstance(value, Mapping):
      inner = forward_matrices(value)
      if inner:
        matrices[name] = inner
  return matrices


def convolve_forward(x, matrix, kernel_size: Tuple[int, int], strides: Tuple[int, int],
                     padding: Padding):
  """A 'matmul' convolution's forward pass with its forward_matrix given: x (in, N, H, W) ->
  (out, N, out_H, out_W), the numbers of convolve(x, kernel, ..., 'matmul') up to float
  rounding (stride-1 kxk convolutions over at most SHIFTED_PRODUCTS_MAX_CHANNELS channels go
  through shifted_products, which sums the taps in another order). Not differentiable by
  design: training goes through convolve's hand-written backward passes."""
  padding = _explicit_padding(padding)
  strides = tuple(int(stride) for stride in strides)
  if tuple(kernel_size) == (1, 1):
    return _contract_rows(matrix, _subsample(x, strides, padding))
  if strides == (1, 1) and x.shape[0] <= SHIFTED_PRODUCTS_MAX_CHANNELS:
    return shifted_products(x, matrix, tuple(kernel_size), padding)
  return _contract_rows(matrix, im2col(x, tuple(kernel_size), strides, padding))


# The most input channels for which convolve_forward computes a stride-1 kxk convolution as
# shifted_products rather than im2col: measured on ResNet-50's evaluation on CPU
# (docs/history.md, "Evaluation without the patch matrix"). Up to 128 channels (the
# first two stages) it made the forward pass 7% faster at 224x224; taking the third stage's 256
# too added 1.5%; the fourth's 512 nothing but noise.
SHIFTED_PRODUCTS_MAX_CHANNELS = 256


def shifted_products(x, matrix, kernel_size: Tuple[int, int], padding):
  """A stride-1 convolution without a patch matrix: x (in, N, H, W) and its forward_matrix
  (out, kh * kw * in) -> (out, N, out_H, out_W).

  One matmul multiplies x by every tap of the kernel at once, (kh * kw * out, in) @ (in, pixels),
  and the output sums the kh * kw products, each shifted by its tap's offset (zero where the tap
  falls on the padding). That reads x once where im2col writes and copies kh * kw shifted copies
  of it; the matmul's FLOPs are the same.
  """
  kernel_height, kernel_width = kernel_size
  out_channels = matrix.shape[0]
  in_channels = x.shape[0]
  if matrix.shape[1] != kernel_height * kernel_width * in_channels:
    raise ValueError(f'A forward matrix of shape {matrix.shape} does not fit a {kernel_size} '
                     f'kernel over {in_channels} channels.')
  # (out, taps * in) -> (taps * out, in); the barrier keeps XLA from folding the transpose into
  # the matmul (see _contract_channels).
  taps = jnp.transpose(matrix.reshape(out_channels, kernel_height * kernel_width, in_channels),
                       (1, 0, 2)).reshape(-1, in_channels)
  products = _contract_rows(lax.optimization_barrier(taps),
                            x).reshape((kernel_height, kernel_width, out_channels) + x.shape[1:])
  (top, bottom), (left, right) = padding
  height, width = x.shape[2:]
  out_height = height + top + bottom - kernel_height + 1
  out_width = width + left + right - kernel_width + 1
  total = None
  for i in range(kernel_height):
    for j in range(kernel_width):
      # Output (h, w) takes tap (i, j) at input (h + i - top, w + j - left): rows [first, last)
      # of the products, zero-padded where they run off the map. A pad of a slice, not a slice
      # of a padded copy, so that XLA fuses every tap into one pass.
      first_row, first_column = i - top, j - left
      last_row, last_column = first_row + out_height, first_column + out_width
      rows = slice(max(first_row, 0), min(last_row, height))
      columns = slice(max(first_column, 0), min(last_column, width))
      if rows.start >= rows.stop or columns.start >= columns.stop:
        continue  # this tap only ever sees padding
      term = jnp.pad(products[i, j, :, :, rows, columns],
                     ((0, 0), (0, 0), (max(-first_row, 0), max(last_row - height, 0)),
                      (max(-first_column, 0), max(last_column - width, 0))))
      total = term if total is None else total + term
  # Some tap always sees the map: together the taps' rows span the padded height, which holds
  # every row of the map (and the same for columns), so total is never None here.
  return total


def convolve(x, kernel, strides: Tuple[int, int], padding: Padding, convolutions: str):
  """x * kernel (kh, kw, in, out), no bias, with x in the layout of `convolutions` (channel_axis:
  'matmul' (in, N, H, W) -> (out, N, out_H, out_W), 'native' (N, H, W, in) ->
  (N, out_H, out_W, out)); the same numbers whatever `convolutions` (up to float rounding)."""
  convolutions = resolve_convolutions(convolutions)
  kernel_height, kernel_width, in_channels, out_channels = kernel.shape
  strides = tuple(int(stride) for stride in strides)
  if convolutions == 'matmul':
    padding = _explicit_padding(padding)
    if (kernel_height, kernel_width) == (1, 1):
      return channel_matmul(_subsample(x, strides, padding),
                            kernel.reshape(in_channels, out_channels))
    return patch_matmul(x, kernel, strides, padding)
  return lax.conv_general_dilated(x,
                                  kernel,
                                  strides,
                                  padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv(nn.Module):
  """A bias-free 2-D convolution with flax.linen.Conv's parameter ('kernel', (kh, kw, in, out)),
  computed by `convolve` with the given `convolutions`, on activations in its layout
  (channel_axis: NHWC for 'native', as flax.linen.Conv, and CNHW for 'matmul')."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'VALID'
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = initializers.lecun_normal()
  convolutions: str = 'auto'

  @nn.compact
  def __call__(self, x):
    if self.use_bias:
      raise ValueError('hml_jax.convolutions.Conv has no bias (ResNets follow every convolution '
                       'by BatchNorm).')
    kernel_size = tuple(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (x.shape[channel_axis(self.convolutions)], self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = tuple(self.strides) if self.strides is not None else (1, 1)
    if (self.has_variable(FORWARD_MATRICES, 'matrix') and
        resolve_convolutions(self.convolutions) == 'matmul'):
      # Evaluation with the kernel transposed beforehand, once for many batches (the kernel
      # above is then unused, and XLA drops it).
      matrix = self.get_variable(FORWARD_MATRICES, 'matrix').astype(self.dtype)
      return convolve_forward(x, matrix, kernel_size, strides, self.padding)
    return convolve(x, kernel, strides, self.padding, self.convolutions)


def _reduction_axes(x, axis: int):
  return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def _per_channel(vector, x, axis: int):
  """A (C,) vector shaped to broadcast against x along its channel axis."""
  shape = [1] * x.ndim
  shape[axis % x.ndim] = vector.shape[0]
  return vector.reshape(shape)


def _batch_statistics(x, axis: int):
  """Mean and (biased) variance over every axis but the channel axis, in float32 whatever x's
  dtype, as flax computes them: E[x^2] - E[x]^2 in one pass, clipped at 0."""
  x = x.astype(jnp.float32)
  axes = _reduction_axes(x, axis)
  mean = jnp.mean(x, axes)
  return mean, jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)


def _normalize(x, mean, inverse_std, scale, bias, dtype, axis: int):
  return ((x.astype(jnp.float32) - _per_channel(mean, x, axis)) *
          _per_channel(inverse_std * scale, x, axis) + _per_channel(bias, x, axis)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_training(x, scale, bias, epsilon: float, dtype, axis: int = -1):
  """BatchNorm with the batch's statistics: x with C channels on `axis`, scale and bias (C,) ->
  (y (x's shape) in dtype, mean (C,), variance (C,)). The statistics are outputs for the running
  averages and carry no gradient."""
  mean, variance = _batch_statistics(x, axis)
  return (_normalize(x, mean, lax.rsqrt(variance + epsilon), scale, bias, dtype,
                     axis), mean, variance)


def _batch_norm_forward(x, scale, bias, epsilon, dtype, axis):
  mean, variance = _batch_statistics(x, axis)
  inverse_std = lax.rsqrt(variance + epsilon)
  outputs = _normalize(x, mean, inverse_std, scale, bias, dtype, axis), mean, variance
  return outputs, (x, mean, inverse_std, scale)


def _batch_norm_backward(epsilon, dtype, axis, residuals, cotangents):
  """With x_hat = (x - mean) / std, y = scale x_hat + bias, over M values per channel:
  d bias = sum dy, d scale = sum dy x_hat,
  dx = scale / (std M) (M dy - d bias - x_hat d scale)."""
  del epsilon, dtype
  x, mean, inverse_std, scale = residuals
  output_gradient = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are zero
  axes = _reduction_axes(x, axis)
  count = x.size // x.shape[axis]
  normalized = (x.astype(jnp.float32) - _per_channel(mean, x, axis)) * _per_channel(
      inverse_std, x, axis)
  bias_gradient = jnp.sum(output_gradient, axes)
  scale_gradient = jnp.sum(output_gradient * normalized, axes)
  input_gradient = _per_channel(scale * inverse_std / count, x, axis) * (
      count * output_gradient - _per_channel(bias_gradient, x, axis) -
      normalized * _per_channel(scale_gradient, x, axis))
  return input_gradient.astype(x.dtype), scale_gradient, bias_gradient


batch_norm_training.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm over the channel axis (`axis`, the last by default) as the ResNets use
  it: parameters 'scale' (ones) and 'bias' (zeros), batch_stats 'mean' and 'var' (the biased
  batch variance, as flax keeps it), running averages with weight `momentum` on the old value,
  float32 statistics, output in dtype."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis: int = -1  # the channel axis: 0 for the channel-major activations of 'matmul'

  @nn.compact
  def __call__(self, x):
    channels = x.shape[self.axis]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_variance = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    if self.use_running_average:
      return _normalize(x, running_mean.value, lax.rsqrt(running_variance.value + self.epsilon),
                        scale, bias, self.dtype, self.axis)
    y, mean, variance = batch_norm_training(x, scale, bias, self.epsilon, self.dtype, self.axis)
    if not self.is_initializing():
      running_mean.value = (self.momentum * running_mean.value +
                            (1 - self.momentum) * lax.stop_gradient(mean))
      running_variance.value = (self.momentum * running_variance.value +
                                (1 - self.momentum) * lax.stop_gradient(variance))
    return y
