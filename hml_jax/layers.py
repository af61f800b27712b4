"""The ResNets' layers, written so that XLA's CPU backend runs them fast: Conv and BatchNorm.

`Conv` is a drop-in for flax.linen.Conv (no bias, a 'kernel' parameter of shape
(kernel_height, kernel_width, in_channels, out_channels), NHWC inputs), so parameters, checkpoints
and imported torchvision weights are the same whichever implementation computes it:

- 'native': lax.conv_general_dilated everywhere (what nn.Conv does). Best on GPU and TPU, whose
  convolution libraries are well tuned.
- 'matmul': what profiling the ResNet-50 train step on CPU showed to be faster (every number and
  every attempt is in docs/performance_notes.md):
  * 1x1 convolutions (two thirds of ResNet-50's) are a matmul over the channel axis,
    `channel_matmul`, whose backward pass is written by hand: XLA otherwise fuses a transpose of
    the output gradient into the BatchNorm backward, which reads memory with a stride of a row and
    took a quarter of the step at 224x224.
  * Every other convolution (3x3, the 7x7 stem) is im2col + that matmul, `patch_matmul`. On
    small maps (ResNet-50's last stage is 2x2 at 64x64 inputs) XLA rewrites a native
    convolution with the kernel and the image swapped, a form its fast path does not take
    (three fifths of the step at 64x64); on larger maps the GEMM on patches is as fast as the
    native convolution with glibc's malloc and 8% faster with tcmalloc.
- 'auto': 'matmul' on CPU, 'native' elsewhere.

`BatchNorm` is flax.linen.BatchNorm as the ResNets use it (the same parameters, statistics and
outputs) with its training-mode backward pass written by hand: two passes over the activations
(one reduction, one elementwise) where automatic differentiation of the statistics left XLA with
more; docs/performance_notes.md has the measurement.
"""
import functools
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'native', 'matmul')

Padding = Union[str, Sequence[Tuple[int, int]]]


def resolve_implementation(implementation: str) -> str:
  """'auto' -> 'matmul' on CPU, 'native' on GPU and TPU; checks the name."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown convolution implementation {implementation!r} '
                     f'(config.convolutions); choose one of {list(IMPLEMENTATIONS)}.')
  if implementation == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'native'
  return implementation


def _contract_channels(x, matrix):
  """x (..., in) @ matrix (in, out) -> (..., out)."""
  return lax.dot_general(x, matrix, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def channel_matmul(x, matrix):
  """x (..., in_channels) @ matrix (in_channels, out_channels) -> (..., out_channels): a 1x1
  convolution, with a hand-written backward pass (see the module docstring)."""
  return _contract_channels(x, matrix)


def _channel_matmul_forward(x, matrix):
  return _contract_channels(x, matrix), (x, matrix)


def _channel_matmul_backward(residuals, output_gradient):
  x, matrix = residuals
  # dx = dy @ matrix^T, contracting the output channels.
  input_gradient = lax.dot_general(output_gradient, matrix,
                                   (((output_gradient.ndim - 1,), (1,)), ((), ())))
  pixels = x.reshape(-1, x.shape[-1])
  gradient_pixels = output_gradient.reshape(-1, output_gradient.shape[-1])
  # d matrix = x^T @ dy over all pixels. Written as a transpose of the operand with fewer
  # channels followed by an ordinary matmul, so that XLA transposes that (smaller) array on its
  # own instead of fusing a strided transpose into whatever produced the gradient.
  if pixels.shape[1] <= gradient_pixels.shape[1]:
    matrix_gradient = pixels.T @ gradient_pixels
  else:
    matrix_gradient = (gradient_pixels.T @ pixels).T
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
  """Patches of a convolution: x (N, H, W, C) -> (N, out_H, out_W, kh * kw * C), ordered as a
  (kh, kw, C, out) kernel reshaped to (kh * kw * C, out)."""
  kernel_height, kernel_width = kernel_size
  stride_height, stride_width = strides
  padding = _explicit_padding(padding)
  if any(pair != (0, 0) for pair in padding):
    x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  height, width = x.shape[1:3]
  out_height = (height - kernel_height) // stride_height + 1
  out_width = (width - kernel_width) // stride_width + 1
  columns = [x[:, i:i + stride_height * (out_height - 1) + 1:stride_height,
               j:j + stride_width * (out_width - 1) + 1:stride_width, :]
             for i in range(kernel_height) for j in range(kernel_width)]
  return columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def patch_matmul(x, kernel, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  """A convolution as im2col(x) @ kernel: x (N, H, W, in), kernel (kh, kw, in, out) ->
  (N, out_H, out_W, out). Its backward pass keeps x, not the kh * kw times larger patches, and
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


def convolve(x, kernel, strides: Tuple[int, int], padding: Padding, implementation: str):
  """x (N, H, W, in) * kernel (kh, kw, in, out) -> (N, out_H, out_W, out), no bias; the same
  result under every implementation (up to float rounding)."""
  implementation = resolve_implementation(implementation)
  kernel_height, kernel_width, in_channels, out_channels = kernel.shape
  strides = tuple(int(stride) for stride in strides)
  if implementation == 'matmul':
    padding = _explicit_padding(padding)
    if (kernel_height, kernel_width) == (1, 1):
      if any(pair != (0, 0) for pair in padding):
        x = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
      return channel_matmul(x[:, ::strides[0], ::strides[1], :],
                            kernel.reshape(in_channels, out_channels))
    return patch_matmul(x, kernel, strides, padding)
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv(nn.Module):
  """A bias-free 2-D convolution with flax.linen.Conv's parameter ('kernel', (kh, kw, in, out))
  and call convention (NHWC), computed by `convolve` with the given implementation."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'VALID'
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x):
    if self.use_bias:
      raise ValueError('hml_jax.convolutions.Conv has no bias (ResNets follow every convolution '
                       'by BatchNorm).')
    kernel_size = tuple(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides = tuple(self.strides) if self.strides is not None else (1, 1)
    return convolve(x, kernel, strides, self.padding, self.implementation)



def _batch_statistics(x):
  """Mean and (biased) variance over every axis but the last, in float32 whatever x's dtype, as
  flax computes them: E[x^2] - E[x]^2 in one pass, clipped at 0."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  return mean, jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)


def _normalize(x, mean, inverse_std, scale, bias, dtype):
  return ((x.astype(jnp.float32) - mean) * (inverse_std * scale) + bias).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_training(x, scale, bias, epsilon: float, dtype):
  """BatchNorm with the batch's statistics: x (..., C), scale and bias (C,) ->
  (y (..., C) in dtype, mean (C,), variance (C,)). The statistics are outputs for the running
  averages and carry no gradient."""
  mean, variance = _batch_statistics(x)
  return _normalize(x, mean, lax.rsqrt(variance + epsilon), scale, bias, dtype), mean, variance


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
  mean, variance = _batch_statistics(x)
  inverse_std = lax.rsqrt(variance + epsilon)
  outputs = _normalize(x, mean, inverse_std, scale, bias, dtype), mean, variance
  return outputs, (x, mean, inverse_std, scale)


def _batch_norm_backward(epsilon, dtype, residuals, cotangents):
  """With x_hat = (x - mean) / std, y = scale x_hat + bias, over M values per channel:
  d bias = sum dy, d scale = sum dy x_hat,
  dx = scale / (std M) (M dy - d bias - x_hat d scale)."""
  del epsilon, dtype
  x, mean, inverse_std, scale = residuals
  output_gradient = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are zero
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  normalized = (x.astype(jnp.float32) - mean) * inverse_std
  bias_gradient = jnp.sum(output_gradient, axes)
  scale_gradient = jnp.sum(output_gradient * normalized, axes)
  input_gradient = (scale * inverse_std / count) * (
      count * output_gradient - bias_gradient - normalized * scale_gradient)
  return input_gradient.astype(x.dtype), scale_gradient, bias_gradient


batch_norm_training.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm over the last axis as the ResNets use it: parameters 'scale' (ones) and
  'bias' (zeros), batch_stats 'mean' and 'var' (the biased batch variance, as flax keeps it),
  running averages with weight `momentum` on the old value, float32 statistics, output in dtype."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_variance = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    if self.use_running_average:
      return _normalize(x, running_mean.value,
                        lax.rsqrt(running_variance.value + self.epsilon), scale, bias, self.dtype)
    y, mean, variance = batch_norm_training(x, scale, bias, self.epsilon, self.dtype)
    if not self.is_initializing():
      running_mean.value = (self.momentum * running_mean.value +
                            (1 - self.momentum) * lax.stop_gradient(mean))
      running_variance.value = (self.momentum * running_variance.value +
                                (1 - self.momentum) * lax.stop_gradient(variance))
    return y
