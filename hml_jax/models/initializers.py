"""Weight initializers that draw their random numbers as one flat vector.

They give bitwise the values of jax.nn.initializers' variance scaling (tests/test_initializers.py):
JAX's random bits of any shape number its elements in row-major order, so a flat draw reshaped
is the shaped draw. What differs is the compile time: XLA on CPU compiles the random bits of a
small 4-d kernel in seconds (jax 0.10 on 2 cores: 4.6 s for a 3x3x8x6 kernel, 7.0 s for
3x3x8x7) and of the same numbers drawn flat in 0.3 s. A ResNet's initialization draws one kernel
per shape, so the shaped draws cost a tiny model's run about 12 s of its 39 s
(docs/performance.md "Compile time and the compilation cache").
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def flat_draw(draw, key, shape: Sequence[int], *args, shape_first: bool = True, **kwargs):
  """draw(key, (size,), *args, **kwargs) reshaped to shape, for draw = jax.random.normal,
  uniform, ... (any function whose numbers are elementwise in its random bits). shape_first=False:
  the flat shape goes after args (jax.random.truncated_normal(key, lower, upper, shape))."""
  shape = tuple(int(size) for size in shape)
  flat = (math.prod(shape),)
  arguments = (flat,) + args if shape_first else args + (flat,)
  return draw(key, *arguments, **kwargs).reshape(shape)


def _fans(shape):
  """(fan_in, fan_out) of a Dense kernel (in, out) or a convolution kernel (H, W, in, out), as
  jax.nn.initializers computes them (in the same floating-point operations)."""
  if len(shape) < 2:
    raise ValueError(f'Variance scaling needs a kernel of at least 2 dimensions, got {shape}.')
  in_size, out_size = shape[-2], shape[-1]
  receptive_field_size = math.prod(shape) / in_size / out_size
  return in_size * receptive_field_size, out_size * receptive_field_size


def variance_scaling(scale: float, mode: str, distribution: str):
  """jax.nn.initializers.variance_scaling(scale, mode, distribution) for float kernels with the
  default axes (in = -2, out = -1), drawn flat."""
  if mode not in ('fan_in', 'fan_out', 'fan_avg'):
    raise ValueError(f'Unknown variance scaling mode {mode!r}.')
  if distribution not in ('truncated_normal', 'normal', 'uniform'):
    raise ValueError(f'Unknown variance scaling distribution {distribution!r}.')

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(int(size) for size in shape)
    if not jnp.issubdtype(dtype, np.floating):
      raise ValueError(f'Only float kernels are supported, got {dtype}.')
    fan_in, fan_out = _fans(shape)
    denominator = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': (fan_in + fan_out) / 2}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    if distribution == 'truncated_normal':
      draw = flat_draw(jax.random.truncated_normal,
                       key,
                       shape,
                       -2,
                       2,
                       dtype=dtype,
                       shape_first=False)
      # The standard deviation of a standard normal truncated to (-2, 2).
      factor = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
    elif distribution == 'normal':
      draw, factor = flat_draw(jax.random.normal, key, shape, dtype=dtype), jnp.sqrt(variance)
    else:
      draw, factor = flat_draw(jax.random.uniform, key, shape, dtype, -1), jnp.sqrt(3 * variance)
    # The barrier keeps XLA from fusing the scaling into the draw when init runs under jax.jit
    # (fused, it rounds differently from the eager values).
    return jax.lax.optimization_barrier(draw) * factor

  return init


def lecun_normal():
  """jax.nn.initializers.lecun_normal() (flax's default Dense and Conv kernel init), flat."""
  return variance_scaling(1.0, 'fan_in', 'truncated_normal')
