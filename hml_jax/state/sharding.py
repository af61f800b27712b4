"""Data parallelism with NamedSharding on a device Mesh (the modern form of pjit), and optionally
FSDP-style sharding of the train state.

One mesh axis, 'data', over every device: batches are split along it. Under jax.jit a batch
sharded this way is one global array, so BatchNorm's batch statistics are computed over the global
batch without any explicit collective.

The train state (parameters, BatchNorm statistics, optimizer state, label state) is laid out by
config.parameter_sharding:
  'replicated': every device holds all of it (plain data parallelism).
  'fsdp': every array of at least config.fsdp_min_size elements is split over the same 'data'
    axis along one of its dimensions (fsdp_spec says which), so each device stores 1/N of it;
    XLA inserts the all-gathers (before the forward and backward passes use a parameter) and the
    reduce-scatters (of the gradients) that this needs. Small arrays stay replicated: splitting
    them would save little memory and cost a collective each. This is ZeRO-3 / FSDP on the data
    axis, as big_vision's 'fsdp' sharding rule does it; the computation, and so the result, is
    the same as replicated up to the order of floating-point reductions.
"""
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from hml_jax.runtime import errors

DATA_AXIS = 'data'

# config.parameter_sharding values (see the module docstring).
PARAMETER_SHARDING_MODES = ('replicated', 'fsdp')


def create_mesh() -> jax.sharding.Mesh:
  # Auto axis types: plain data parallelism, the compiler propagates shardings (jax >= 0.7 makes
  # Explicit the default for make_mesh).
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(batch, mesh):
  """Host NumPy arrays (this process's part of the batch) -> global arrays split over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                                batch)


def check_parameter_sharding(mode: str, min_size: int) -> None:
  """Raises ValueError for an unknown config.parameter_sharding or a bad config.fsdp_min_size."""
  if mode not in PARAMETER_SHARDING_MODES:
    raise errors.InvalidInputError(f'Unknown config.parameter_sharding={mode!r}; choose one of '
                                   f'{list(PARAMETER_SHARDING_MODES)}.')
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise errors.InvalidInputError(
        f'config.fsdp_min_size must be a non-negative integer (a number of array '
        f'elements), got {min_size!r}.')


def fsdp_spec(shape, num_shards: int, min_size: int) -> PartitionSpec:
  """Where an array of this shape is split in 'fsdp' mode.

  Arrays of fewer than min_size elements, and arrays none of whose dimensions num_shards divides,
  are replicated: PartitionSpec(). Otherwise the largest dimension that num_shards divides is
  split over DATA_AXIS (on a tie the later dimension: the output features of a Dense or Conv
  kernel, as big_vision's rule picks). E.g. with 8 shards: (2048, 5000) -> P(None, 'data');
  (3, 3, 512, 512) -> P(None, None, None, 'data'); (2048, 81) -> P('data', None);
  (81, 9) -> P() (nothing divisible).
  """
  shape = tuple(shape)
  if num_shards <= 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  # Largest first, and among equal sizes the last axis first.
  for axis in sorted(range(len(shape)), key=lambda axis: (shape[axis], axis), reverse=True):
    if shape[axis] % num_shards == 0:
      return PartitionSpec(*(DATA_AXIS if i == axis else None for i in range(len(shape))))
  return PartitionSpec()


def state_shardings(state_or_shapes, mesh, mode: str, min_size: int):
  """A pytree of NamedSharding with the structure of state_or_shapes: one per array.

  state_or_shapes: any pytree whose leaves have a shape (jax or NumPy arrays, or the
  jax.ShapeDtypeStruct leaves of jax.eval_shape(create_train_state...)), so the layout can be
  computed before the state exists. mode, min_size: config.parameter_sharding, fsdp_min_size.
  """
  check_parameter_sharding(mode, min_size)
  num_shards = mesh.shape[DATA_AXIS]

  def spec(leaf):
    if mode == 'replicated':
      return PartitionSpec()
    return fsdp_spec(np.shape(leaf), num_shards, min_size)

  return jax.tree_util.tree_map(lambda leaf: NamedSharding(mesh, spec(leaf)), state_or_shapes)


def place(tree, shardings):
  """Host values (the same on every process) -> global arrays laid out by shardings (a pytree
  of NamedSharding with tree's structure, e.g. from state_shardings). Unlike jax.device_put, this
  also works when the mesh spans several processes: each process builds only the shards of its
  own devices, slicing them from its copy of the value."""

  def place_one(value, target):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

  return jax.tree_util.tree_map(place_one, jax.device_get(tree), shardings)


def abstract_arrays(shapes, shardings):
  """jax.ShapeDtypeStruct leaves carrying shardings: a target for restoring a checkpoint straight
  into that layout (each process reads only its shards) without creating the arrays first."""
  return jax.tree_util.tree_map(
      lambda leaf, target: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=target),
      shapes, shardings)


def gather_to_host(tree, mesh):
  """Global arrays, however they are laid out, -> NumPy arrays of their whole value on every
  process. jax.device_get alone fails on an array that is split over other processes' devices;
  this first all-gathers it onto every device (a collective: every process must call it)."""
  gathered = jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)
  return jax.tree_util.tree_map(np.asarray, jax.device_get(gathered))
