"""Bytes per device of a compiled step: what the state holds and what XLA allocates around it.

`memory_analysis()` of a compiled program reports its arguments (the state and the batch), its
outputs, the outputs aliased onto donated arguments, and temporaries (activations, gradients and
optimizer intermediates live there). The state's own parts are counted from each array's
sharding, so parameters, optimizer state and gradients are reported separately.
`device_memory_bytes` is what a device can hold, to compare a step's estimate with.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Bytes of one logical copy of `tree`."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class MemoryReport:
    """Per-device bytes. `grads` is what gradients occupy in their layout (they are temporaries of
    the step, so they are also inside `temp`); the others are disjoint."""

    params: int
    optimizer: int
    grads: int
    arguments: int
    outputs: int
    aliased: int
    temp: int

    @property
    def peak_estimate(self) -> int:
        """Arguments + temporaries + outputs not written over donated arguments."""
        return self.arguments + self.temp + self.outputs - self.aliased


def memory_report(compiled: jax.stages.Compiled, state: Any,
                  grad_shardings: Any | None = None) -> MemoryReport:
    """Per-device bytes of `compiled` (a compiled train step) for `state` (a `TrainState` of
    arrays or ShapeDtypeStructs with shardings). Gradients are laid out like `grad_shardings`
    (default: like the parameters)."""
    stats = compiled.memory_analysis()
    get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731 - absent on some backends
    if grad_shardings is None:
        grads = bytes_per_device(state.params)
    else:
        grads = bytes_per_device(jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state.params, grad_shardings))
    return MemoryReport(
        params=bytes_per_device(state.params), optimizer=bytes_per_device(state.opt_state),
        grads=grads, arguments=get("argument_size_in_bytes"),
        outputs=get("output_size_in_bytes"), aliased=get("alias_size_in_bytes"),
        temp=get("temp_size_in_bytes"))


def device_memory_bytes(device: Any = None) -> tuple[int, str]:
    """(bytes one device can hold, what they are): an accelerator's own limit
    (`memory_stats()["bytes_limit"]`), or on CPU the host's physical memory divided among this
    process's devices (virtual CPU devices share it)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"the limit of a {device.device_kind}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, jax.local_device_count())
    return total // local, (f"{total / 2**30:.1f} GiB of host memory shared by {local} "
                            f"{device.platform} device(s)")
