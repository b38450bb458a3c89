"""Device meshes: the 1-D mesh of data parallelism and the named 5-D mesh of model parallelism."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.axes import DATA_AXIS, MESH_AXES  # noqa: F401 - re-exported
from jaxdist.core.step import is_prng_key
from jaxdist.errors import UsageError


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


# The axes of model parallelism, outermost first: devices that differ only in "tensor" are
# neighbours (tensor parallelism talks most), "pipeline" stages are farthest apart.


def put_global_batch(local_batch: Any, sharding: NamedSharding, pieces: int, hint: str,
                     stacked_over: int = 0) -> Any:
    """This process's rows of a global batch -> global arrays laid out by `sharding`.

    `pieces`: how many parts this process's rows split into (its local devices along the batch
    axes); a batch that does not divide is a `UsageError` ending with `hint`. `stacked_over` > 0
    adds pmap's leading device axis of that size.
    """

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % pieces:
            raise UsageError(f"a batch of {x.shape[0] if x.ndim else 0} rows per process does not "
                             f"divide {hint}")
        if stacked_over:
            x = x.reshape(stacked_over, x.shape[0] // stacked_over, *x.shape[1:])
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)  # same result, less per-call overhead
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def put_host_tree(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) -> global arrays laid out by `shardings`.

    `jax.device_put` refuses shardings over other processes' devices; this builds each array from
    the local copy instead, PRNG keys through their key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        if is_prng_key(x):
            impl = jax.random.key_impl(x)
            data = put(np.asarray(jax.random.key_data(x)), NamedSharding(sharding.mesh, P()))
            return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl),
                           out_shardings=sharding)(data)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def parse_mesh_shape(text: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}.

    Raises:
        UsageError: malformed text, an unknown axis, a repeated axis or a size below 1.
    """
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or not size.strip().isdigit():
            raise UsageError(f"bad mesh entry {part!r}; write AXIS=SIZE, e.g. data=2,fsdp=4")
        if name not in MESH_AXES:
            raise UsageError(f"unknown mesh axis {name!r}; choose from {', '.join(MESH_AXES)}")
        if name in shape:
            raise UsageError(f"mesh axis {name!r} given twice in {text!r}")
        shape[name] = int(size)
    return shape


def make_mesh(shape: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all the axes of `MESH_AXES` (those not in `shape` have size 1).

    Raises:
        UsageError: an unknown axis, a size below 1, or a product other than the device count.
    """
    if isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise UsageError(f"unknown mesh axis {sorted(unknown)[0]!r}; choose from "
                         f"{', '.join(MESH_AXES)}")
    sizes = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)
    if min(sizes) < 1:
        raise UsageError(f"mesh axis sizes must be >= 1, got {dict(shape)}")
    devices = list(devices) if devices is not None else jax.devices()
    if math.prod(sizes) != len(devices):
        described = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s > 1) or "1 device"
        raise UsageError(f"mesh {described} needs {math.prod(sizes)} devices, but "
                         f"{len(devices)} are in use; make the sizes multiply to {len(devices)}")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
