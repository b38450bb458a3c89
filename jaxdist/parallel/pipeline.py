"""GPipe pipeline parallelism over the "pipeline" mesh axis, with `jax.shard_map` and `ppermute`.

S identical stages (e.g. transformer blocks) have their parameters stacked on a leading axis of
size S that is split over the pipeline axis, so each device holds one stage. The batch is cut
into M microbatches. At tick t stage 0 takes microbatch t, every stage applies itself to what it
holds and passes the result to the next stage with `lax.ppermute`; after M + S - 1 ticks the last
stage has produced every microbatch. The backward pass is pipelined too: it is the transpose of the
same program (the transpose of a ppermute is the reverse ppermute).

Stages idle for (S - 1) of the M + S - 1 ticks (`bubble_fraction`), so M should be several times S.
The batch may be split over data-parallel axes at the same time (e.g. mesh pipeline=4,data=2).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdist.errors import UsageError

PIPELINE_AXIS = "pipeline"


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The share of ticks a stage spends idle: (S - 1) / (M + S - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def stack_stages(stages: Sequence[Any]) -> Any:
    """S pytrees of identical structure -> one pytree whose leaves have a leading axis of S."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stages)


def unstack_stages(stacked: Any) -> list[Any]:
    """The inverse of `stack_stages`."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def _check(mesh: Mesh, axis: str, batch_axes: tuple[str, ...], stacked: Any, x: jax.Array,
           num_microbatches: int) -> None:
    for name in (axis, *batch_axes):
        if name not in mesh.shape:
            raise UsageError(f"the mesh has no axis {name!r}; its axes are {tuple(mesh.shape)}")
    stages = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if stages != {mesh.shape[axis]}:
        raise UsageError(f"{sorted(stages)} stacked stages for a pipeline axis of size "
                         f"{mesh.shape[axis]}; stack exactly one stage per device of the axis")
    ways = 1
    for name in batch_axes:
        ways *= mesh.shape[name]
    if num_microbatches < 1 or x.shape[0] % (ways * num_microbatches):
        raise UsageError(f"a batch of {x.shape[0]} does not split into {num_microbatches} "
                         f"microbatches on each of {ways} data-parallel groups; use a batch "
                         f"divisible by {ways * max(num_microbatches, 1)}")


def _varying(tree: Any, axis: str) -> Any:
    """Marks zeros as differing across `axis`, as the loop's carry will (shard_map's type check)."""
    cast = getattr(lax, "pcast", None)
    if cast is not None:
        return jax.tree.map(lambda x: cast(x, (axis,), to="varying"), tree)
    return jax.tree.map(lambda x: lax.pvary(x, (axis,)), tree)  # jax < 0.8


def pipeline_call(stage_fn: Callable[[Any, jax.Array], jax.Array], stacked_params: Any,
                  x: jax.Array, *, mesh: Mesh, num_microbatches: int, axis: str = PIPELINE_AXIS,
                  batch_axes: Sequence[str] = ("data",)) -> jax.Array:
    """Applies S stages in sequence, `stage_fn(params_s, h) -> h` (shape-preserving), pipelined.

    Equal to `for s in range(S): x = stage_fn(params[s], x)`, and differentiable.

    Args:
        stage_fn: one stage; all stages share it and differ in their parameters.
        stacked_params: the stages' parameters stacked on a leading axis of size S (the pipeline
            axis size); laid out `P(axis)` on the mesh, or let the call reshard them.
        x: the global batch, leading dimension split over `batch_axes`.
        num_microbatches: M; each data-parallel group's batch splits into M equal microbatches.
    """
    batch_axes = tuple(a for a in batch_axes if a != axis)
    _check(mesh, axis, batch_axes, stacked_params, x, num_microbatches)
    stages = mesh.shape[axis]
    batch_spec = P(batch_axes if batch_axes else None)

    def local(params, h):
        params = jax.tree.map(lambda p: p[0], params)  # this device's stage
        stage = lax.axis_index(axis)
        micro = h.reshape(num_microbatches, h.shape[0] // num_microbatches, *h.shape[1:])
        forward = [(i, i + 1) for i in range(stages - 1)]

        def tick(carry, t):
            held, outputs = carry
            fresh = lax.dynamic_index_in_dim(micro, jnp.minimum(t, num_microbatches - 1),
                                             keepdims=False)
            out = stage_fn(params, jnp.where(stage == 0, fresh, held))
            done = t - (stages - 1)  # the microbatch the last stage finishes at this tick
            store = (stage == stages - 1) & (done >= 0)
            outputs = jnp.where(store, lax.dynamic_update_index_in_dim(
                outputs, out, jnp.maximum(done, 0), 0), outputs)
            return (lax.ppermute(out, axis, forward), outputs), None

        init = _varying((jnp.zeros_like(micro[0]), jnp.zeros_like(micro)), axis)
        (_, outputs), _ = lax.scan(tick, init, jnp.arange(num_microbatches + stages - 1))
        # only the last stage holds the results: share them with every stage
        outputs = lax.psum(jnp.where(stage == stages - 1, outputs, 0), axis)
        return outputs.reshape(h.shape)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), batch_spec),
                         out_specs=batch_spec)(stacked_params, x)
