"""The device mesh and the shardings of data parallelism, declared in one place."""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A 1-D mesh over `devices` whose single axis splits the batch.

    The axis is Auto: XLA's partitioner inserts the gradient all-reduce for `jax.jit`, and
    `jax.shard_map` makes it manual where we write collectives ourselves.
    """
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=list(devices)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch, or replica) dimension is split across the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))
