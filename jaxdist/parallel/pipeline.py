"""Pipeline parallelism over the "pipeline" mesh axis: GPipe, interleaved and 1F1B, with
`jax.shard_map`.

S stages have their parameters stacked on a leading axis of size S that is split over the
pipeline axis, so each device holds one stage; a model's stack of L layers becomes S stages of
L / S layers. The batch is cut into M microbatches. Only the pipeline axis is manual: inside a
stage the data, fsdp and tensor axes stay with XLA's partitioner, so a pipeline combines with data
parallelism, FSDP and tensor parallelism in one mesh (e.g. pipeline=2,data=2,tensor=2).

Every schedule is a scan of ticks in which every device runs the same program and passes its
result on with an unconditional `lax.ppermute`; only which microbatch a device works on varies.
No schedule has a conditional: XLA:CPU runs the collectives of a conditional's branch (a stage's
FSDP gathers, tensor-parallel reductions) in no fixed order, and that deadlocked 1 run in 4.

- **GPipe** (`pipeline_call`): at tick t stage s applies itself to microbatch t - s; after
  M + S - 1 ticks the last stage has every output. The backward pass is autodiff's transpose of
  the same program, so each stage keeps the activations of all M microbatches until it starts.
- **Interleaved** (`pipeline_call(..., virtual_stages=V)`): each device holds V chunks of
  L / (S V) layers, device d the chunks d, d + S, ... (Narayanan et al. 2021's circular
  placement). A microbatch goes round the ring of devices V times; stage 0 takes the microbatch
  coming back from the last device instead of a new one. M V + S - 1 ticks of a V times smaller
  stage: the bubble shrinks from (S - 1) / (M + S - 1) to (S - 1) / (V M + S - 1).
- **1F1B** (`jaxdist.parallel.pipeline_1f1b.pipeline_loss_1f1b`): the schedule owns the loss
  and computes the gradients while it runs: S - 1 forward ticks, M ticks that each fuse one
  forward and one backward, S - 1 backward ticks. As many forwards and backwards as GPipe's, and
  a stage keeps the saved activations of at most min(M, 2 S - 1) microbatches, whatever M.

All take an optional `context`: a pytree of per-row inputs that are not differentiated (e.g. the
segment ids of packed documents), replicated over the pipeline axis, split into microbatches like
the batch; a stage then runs `stage_fn(params, h, context_k)` with the rows of the microbatch k
it is working on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.layout import activation_spec, scan_layers
from jaxdist.errors import UsageError

PIPELINE_AXIS = "pipeline"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_fraction(num_stages: int, num_microbatches: int, schedule: str = "gpipe",
                    virtual_stages: int = 1) -> float:
    """The share of a stage's computed work that serves no microbatch. GPipe and 1F1B: S - 1 of
    M + S - 1 forward ticks and as many backward ones, (S - 1) / (M + S - 1). Interleaved: ticks
    of one of V chunks, (S - 1) / (V M + S - 1)."""
    v = virtual_stages if schedule == "interleaved" else 1
    return (num_stages - 1) / (v * num_microbatches + num_stages - 1)


def stack_stages(stages: Sequence[Any]) -> Any:
    """S pytrees of identical structure -> one pytree whose leaves have a leading axis of S."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stages)


def unstack_stages(stacked: Any) -> list[Any]:
    """The inverse of `stack_stages`."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def check_inputs(mesh: Mesh, axis: str, batch_axes: tuple[str, ...], stacked: Any, x: jax.Array,
                 num_microbatches: int, context: Any = None) -> None:
    """Clear errors for a mesh, a stage stack, a batch or a context that do not fit."""
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
    rows = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(context)}
    if rows - {x.shape[0]}:
        raise UsageError(f"the context's leaves have leading dimensions {sorted(rows, key=str)}, "
                         f"the batch has {x.shape[0]} rows; give every context leaf the batch "
                         f"as its leading dimension")


def apply_stage(stage_fn: Callable, params: Any, h: jax.Array, context: Any) -> jax.Array:
    """`stage_fn(params, h)`, or `stage_fn(params, h, context)` when there is a context: callers
    without one keep their two-argument stage functions."""
    return stage_fn(params, h) if context is None else stage_fn(params, h, context)


def microbatch(micro: Any, k: jax.Array) -> Any:
    """Microbatch `k` of every leaf of a pytree split by `split_microbatches`."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, k, keepdims=False), micro)


def put_microbatch(micro: jax.Array, k: jax.Array, value: jax.Array, on: jax.Array) -> jax.Array:
    """`micro` with microbatch `k` replaced by `value` where `on`: selects one microbatch, not the
    whole buffer, so a tick costs the same whatever M."""
    old = lax.dynamic_index_in_dim(micro, k, keepdims=False)
    return lax.dynamic_update_index_in_dim(micro, jnp.where(on, value, old), k, 0)


def split_microbatches(h: jax.Array, m: int, batch_axes: tuple[str, ...]) -> jax.Array:
    """(B, ...) -> (M, B / M, ...), microbatch k = rows k, k + M, ...: each microbatch keeps its
    share of every data-parallel group's rows, so no rows move between devices."""
    micro = h.reshape(h.shape[0] // m, m, *h.shape[1:]).swapaxes(0, 1)
    mesh = jax.sharding.get_abstract_mesh()
    spec = activation_spec(micro.shape, (None, "batch"), {"batch": batch_axes},
                           dict(mesh.shape), tuple(mesh.manual_axes))
    return lax.with_sharding_constraint(micro, NamedSharding(mesh, spec))


def join_microbatches(micro: jax.Array) -> jax.Array:
    return micro.swapaxes(0, 1).reshape(-1, *micro.shape[2:])


def varying(tree: Any, axis: str) -> Any:
    """Marks zeros as differing across `axis`, as the loop's carry will (shard_map's type check)."""
    cast = getattr(lax, "pcast", None)
    if cast is not None:
        return jax.tree.map(lambda x: cast(x, (axis,), to="varying"), tree)
    return jax.tree.map(lambda x: lax.pvary(x, (axis,)), tree)  # jax < 0.8


def _chunk(stage_fn: Callable, index: jax.Array, params: Any, h: jax.Array, context: Any
           ) -> jax.Array:
    """Chunk `index` of a device's stacked chunks applied to `h`, differentiable in `params` and
    `h`. Its backward slices the chunk's parameters again instead of saving them: a loop over
    ticks would otherwise keep one copy per tick."""
    from jaxdist.parallel.pipeline_1f1b import forward_saving

    take = lambda p, i: jax.tree.map(  # noqa: E731
        lambda a: lax.dynamic_index_in_dim(a, i, 0, False), p)
    structure = []  # the pullback's structure, found when the forward is traced

    @jax.custom_vjp
    def run(params, h, index, context):
        return apply_stage(stage_fn, take(params, index), h, context)

    def forward(params, h, index, context):
        y, saved, pullback = forward_saving(stage_fn, take(params, index), h, context)
        structure.append(pullback)
        return y, (params, saved, index)

    def backward(res, g):
        params, saved, index = res
        d_chunk, d_h = structure[0].rebuild(take(params, index), saved)(g)
        d_params = jax.tree.map(lambda p, d: lax.dynamic_update_index_in_dim(
            jnp.zeros_like(p), d, index, 0), params, d_chunk)
        return d_params, d_h, None, None

    run.defvjp(forward, backward)
    return run(params, h, index, context)


def pipeline_call(stage_fn: Callable[..., jax.Array], stacked_params: Any, x: jax.Array, *,
                  mesh: Mesh, num_microbatches: int, axis: str = PIPELINE_AXIS,
                  batch_axes: Sequence[str] = ("data",), context: Any = None,
                  virtual_stages: int = 1, unroll: bool = False) -> jax.Array:
    """GPipe: S stages in sequence, `stage_fn(params_s, h) -> h` (shape-preserving), pipelined;
    with `virtual_stages` V > 1, the interleaved (circular) schedule over S V stages.

    Equal to `for s in range(S): x = stage_fn(params[s], x)` (V > 1: over the stages
    `params[d, r]` in the order r S + d), and differentiable; with a context, to
    `x = stage_fn(params[s], x, context)`.

    Args:
        stage_fn: one stage; all stages share it and differ in their parameters.
        stacked_params: the stages' parameters stacked on a leading axis of size S (the pipeline
            axis size), then, with V > 1, an axis of V: device d's chunks d, d + S, ...; laid
            out `P(axis)` on the mesh, or let the call reshard them.
        x: the global batch; its other mesh axes stay as XLA lays them out.
        num_microbatches: M; each data-parallel group's batch splits into M equal microbatches
            (V > 1: M >= S, so a microbatch is back at stage 0 before its next round starts).
        batch_axes: the mesh axes that split the batch (kept split inside every microbatch).
        context: None, or a pytree whose leaves have the batch as leading dimension (per-row
            inputs that are not differentiated, e.g. segment ids); each stage gets the rows of
            the microbatch it works on.
        virtual_stages: V, chunks per device (1: GPipe).
        unroll: compile every tick on its own (XLA's cost analysis counts a loop's body once:
            `benchmarks/pipeline.py` unrolls to count every tick's FLOPs).
    """
    batch_axes = tuple(a for a in batch_axes if a != axis)
    check_inputs(mesh, axis, batch_axes, stacked_params, x, num_microbatches, context)
    stages, m, v = mesh.shape[axis], num_microbatches, virtual_stages
    if v > 1:
        chunks = {leaf.shape[1] if leaf.ndim > 1 else None
                  for leaf in jax.tree.leaves(stacked_params)}
        if chunks != {v}:
            raise UsageError(f"{sorted(chunks, key=str)} chunks per stage for {v} virtual "
                             f"stages; stack the parameters as (stages, virtual stages, ...)")
        if m < stages:
            raise UsageError(f"the interleaved schedule needs at least as many microbatches as "
                             f"stages ({stages}), got {m}")

    def local(params, h, ctx):
        params = jax.tree.map(lambda p: p[0], params)  # this device's stage (V > 1: its chunks)
        stage = lax.axis_index(axis)
        micro = split_microbatches(h, m, batch_axes)
        micro_ctx = jax.tree.map(lambda c: split_microbatches(c, m, batch_axes), ctx)
        ring = [(i, (i + 1) % stages) for i in range(stages if v > 1 else stages - 1)]

        def tick(carry, t):
            held, returned, outputs = carry
            work = t - stage  # the work item of this stage: round work // M of microbatch % M
            k, rnd = work % m, jnp.clip(work // m, 0, v - 1)
            if v > 1:  # stage 0 keeps what comes back from the last stage for its next round
                back = t - stages  # the work item `held` finished at the last stage
                returned = put_microbatch(returned, back % m, held,
                                          (back >= 0) & (back < (v - 1) * m))
                first = jnp.where(work < m, micro[k], returned[k])
                run = functools.partial(_chunk, stage_fn, rnd)
            else:
                first = micro[jnp.clip(work, 0, m - 1)]
                run = functools.partial(apply_stage, stage_fn)
            out = run(params, jnp.where(stage == 0, first, held), microbatch(micro_ctx, k))
            done = work - (v - 1) * m  # the microbatch the last stage finishes at this tick
            outputs = put_microbatch(outputs, jnp.clip(done, 0, m - 1), out,
                                     (stage == stages - 1) & (done >= 0) & (done < m))
            return (lax.ppermute(out, axis, ring), returned, outputs), None

        returned = micro if v > 1 else micro[:0]
        init = varying((jnp.zeros_like(micro[0]), jnp.zeros_like(returned),
                        jnp.zeros_like(micro)), axis)
        (_, _, outputs), _ = lax.scan(tick, init, jnp.arange(v * m + stages - 1), unroll=unroll)
        # only the last stage holds the results: share them with every stage
        outputs = lax.psum(jnp.where(stage == stages - 1, outputs, 0), axis)
        return join_microbatches(outputs)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P()), out_specs=P(),
                         axis_names={axis})(stacked_params, x, context)


# ---------------------------------------------------------------------------------------------
# A model's layer stack as pipeline stages (what a trainer puts into `jaxdist.core.layout`)


def as_stages(stacked: Any, stages: int, virtual_stages: int = 1) -> Any:
    """A stack of L layers (leading axis L) -> S stages of L / S consecutive layers; with
    `virtual_stages` V > 1, (S, V, L / (S V)): device d's chunks d, d + S, ... of L / (S V)
    consecutive layers (a transpose of the layer order, so XLA moves parameters between the
    devices of the pipeline axis, and their gradients back, every step)."""
    layers = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    (count,) = layers
    v = virtual_stages
    if count % (stages * v):
        raise UsageError(f"the model's {count} layers do not split into {stages} pipeline "
                         f"stages of {v} chunks; choose sizes whose product divides {count}")
    if v == 1:
        return jax.tree.map(lambda x: x.reshape(stages, count // stages, *x.shape[1:]), stacked)
    return jax.tree.map(lambda x: x.reshape(v, stages, count // (stages * v), *x.shape[1:])
                        .swapaxes(0, 1), stacked)


def stack_runners(mesh: Mesh, *, microbatches: int, schedule: str = "gpipe",
                  batch_axes: Sequence[str] = ("data", "fsdp"), axis: str = PIPELINE_AXIS,
                  virtual_stages: int = 2) -> tuple[Callable, Callable | None]:
    """(run_layers, layers_then_loss) for `jaxdist.core.layout.Layout` on a pipelined mesh;
    `virtual_stages` only counts for the interleaved schedule."""
    from jaxdist.parallel.pipeline_1f1b import pipeline_loss_1f1b

    if schedule not in SCHEDULES:
        raise UsageError(f"unknown pipeline schedule {schedule!r}; choose one of "
                         f"{', '.join(SCHEDULES)}")
    stages = mesh.shape[axis]
    v = virtual_stages if schedule == "interleaved" else 1
    options = dict(mesh=mesh, num_microbatches=microbatches, axis=axis, batch_axes=batch_axes)

    def run_layers(layer_fn, stacked, h, *, context=None):
        stage_fn = functools.partial(scan_layers, layer_fn)  # (params, h[, context])
        return pipeline_call(stage_fn, as_stages(stacked, stages, v), h, context=context,
                             virtual_stages=v, **options)

    def layers_then_loss(layer_fn, head_loss_fn, stacked, head_params, h, targets, *,
                         context=None):
        stage_fn = functools.partial(scan_layers, layer_fn)
        return pipeline_loss_1f1b(stage_fn, head_loss_fn, as_stages(stacked, stages),
                                  head_params, h, targets, context=context, **options)

    return run_layers, (layers_then_loss if schedule == "1f1b" else None)
