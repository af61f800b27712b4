"""Data parallelism with NamedSharding on a device Mesh (the modern form of pjit).

One mesh axis, 'data', over every device: batches are split along it, parameters and optimizer
state are replicated. Under jax.jit a batch sharded this way is one global array, so BatchNorm's
batch statistics are computed over the global batch without any explicit collective.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = 'data'


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
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh):
  """Host values (the same on every process) -> arrays replicated over the whole mesh. Unlike
  jax.device_put, this also works when the mesh spans several processes."""
  target = replicated(mesh)

  def place(value):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])
  return jax.tree_util.tree_map(place, jax.device_get(tree))
