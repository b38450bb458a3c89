"""Pipeline parallelism over the "pipeline" mesh axis: GPipe and 1F1B, with `jax.shard_map`.

S stages have their parameters stacked on a leading axis of size S that is split over the
pipeline axis, so each device holds one stage; a model's stack of L layers becomes S stages of
L / S layers. The batch is cut into M microbatches. Only the pipeline axis is manual: inside a
stage the data, fsdp and tensor axes stay with XLA's partitioner, so a pipeline combines with data
parallelism, FSDP and tensor parallelism in one mesh (e.g. pipeline=2,data=2,tensor=2).

- **GPipe** (`pipeline_call`): at tick t stage 0 takes microbatch t, every stage applies itself
  and passes its result on with `lax.ppermute`; after M + S - 1 ticks the last stage has every
  output. The backward pass is autodiff's transpose of the same program, so each stage keeps the
  activations of all M microbatches until the backward starts.
- **1F1B** (`pipeline_loss_1f1b`): the schedule owns the loss. A stage runs a backward as soon as
  one is possible and starts a new forward only while fewer than S - s microbatches are in flight,
  so at most S microbatches' inputs are alive per stage; the backward recomputes the stage's
  forward from its saved input (`jax.vjp`). Memory is bounded by S microbatches instead of M. The
  schedule is computed once in Python (`schedule_1f1b`) and run as a scan of 2 (M + S - 1) - 2
  units, each one masked program (a forward and a backward, see `pipeline_loss_1f1b`): it buys
  the memory with compute, M useful units of those (`bubble_fraction(S, M, "1f1b")`).

Both take an optional `context`: a pytree of per-row inputs that are not differentiated (e.g. the
segment ids of packed documents), replicated over the pipeline axis, split into microbatches like
the batch; a stage then runs `stage_fn(params, h, context_k)` with the rows of the microbatch k
it is working on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.layout import activation_spec, scan_layers
from jaxdist.errors import UsageError

PIPELINE_AXIS = "pipeline"
SCHEDULES = ("gpipe", "1f1b")
IDLE, FORWARD, BACKWARD, LAST = 0, 1, 2, 3  # LAST: the last stage's forward, loss and backward


def bubble_fraction(num_stages: int, num_microbatches: int, schedule: str = "gpipe") -> float:
    """The share of a stage's computed work that serves no microbatch. GPipe: its idle ticks,
    (S - 1) / (M + S - 1). 1F1B: every one of its 2 (M + S - 1) - 2 units computes a forward and a
    backward (one masked program, see `pipeline_loss_1f1b`) and M of them are a microbatch's
    backward, so 1 - M / units."""
    if schedule == "1f1b" and num_stages > 1:
        return 1 - num_microbatches / len(schedule_1f1b(num_stages, num_microbatches))
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


def _check_context(context: Any, x: jax.Array) -> None:
    rows = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(context)}
    if rows - {x.shape[0]}:
        raise UsageError(f"the context's leaves have leading dimensions {sorted(rows, key=str)}, "
                         f"the batch has {x.shape[0]} rows; give every context leaf the batch "
                         f"as its leading dimension")


def _apply(stage_fn: Callable, params: Any, h: jax.Array, context: Any) -> jax.Array:
    """`stage_fn(params, h)`, or `stage_fn(params, h, context)` when there is a context: callers
    without one keep their two-argument stage functions."""
    return stage_fn(params, h) if context is None else stage_fn(params, h, context)


def _microbatch(micro: Any, k: jax.Array) -> Any:
    """Microbatch `k` of every leaf of a pytree split by `_split_microbatches`."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, k, keepdims=False), micro)


def _never_differentiated(tree: Any) -> Any:
    """The zero cotangents of inputs the loss is not differentiated in (targets, context)."""
    return jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tree)


def _varying(tree: Any, axis: str) -> Any:
    """Marks zeros as differing across `axis`, as the loop's carry will (shard_map's type check)."""
    cast = getattr(lax, "pcast", None)
    if cast is not None:
        return jax.tree.map(lambda x: cast(x, (axis,), to="varying"), tree)
    return jax.tree.map(lambda x: lax.pvary(x, (axis,)), tree)  # jax < 0.8


def _split_microbatches(h: jax.Array, m: int, batch_axes: tuple[str, ...]) -> jax.Array:
    """(B, ...) -> (M, B / M, ...), microbatch k = rows k, k + M, ...: each microbatch keeps its
    share of every data-parallel group's rows, so no rows move between devices."""
    micro = h.reshape(h.shape[0] // m, m, *h.shape[1:]).swapaxes(0, 1)
    mesh = jax.sharding.get_abstract_mesh()
    spec = activation_spec(micro.shape, (None, "batch"), {"batch": batch_axes},
                           dict(mesh.shape), tuple(mesh.manual_axes))
    return lax.with_sharding_constraint(micro, NamedSharding(mesh, spec))


def _join_microbatches(micro: jax.Array) -> jax.Array:
    return micro.swapaxes(0, 1).reshape(-1, *micro.shape[2:])


def pipeline_call(stage_fn: Callable[..., jax.Array], stacked_params: Any, x: jax.Array, *,
                  mesh: Mesh, num_microbatches: int, axis: str = PIPELINE_AXIS,
                  batch_axes: Sequence[str] = ("data",), context: Any = None) -> jax.Array:
    """GPipe: S stages in sequence, `stage_fn(params_s, h) -> h` (shape-preserving), pipelined.

    Equal to `for s in range(S): x = stage_fn(params[s], x)`, and differentiable; with a context,
    to `x = stage_fn(params[s], x, context)`.

    Args:
        stage_fn: one stage; all stages share it and differ in their parameters.
        stacked_params: the stages' parameters stacked on a leading axis of size S (the pipeline
            axis size); laid out `P(axis)` on the mesh, or let the call reshard them.
        x: the global batch; its other mesh axes stay as XLA lays them out.
        num_microbatches: M; each data-parallel group's batch splits into M equal microbatches.
        batch_axes: the mesh axes that split the batch (kept split inside every microbatch).
        context: None, or a pytree whose leaves have the batch as leading dimension (per-row
            inputs that are not differentiated, e.g. segment ids); each stage gets the rows of
            the microbatch it works on.
    """
    batch_axes = tuple(a for a in batch_axes if a != axis)
    _check(mesh, axis, batch_axes, stacked_params, x, num_microbatches)
    _check_context(context, x)
    stages, m = mesh.shape[axis], num_microbatches

    def local(params, h, ctx):
        params = jax.tree.map(lambda p: p[0], params)  # this device's stage
        stage = lax.axis_index(axis)
        micro = _split_microbatches(h, m, batch_axes)
        micro_ctx = jax.tree.map(lambda c: _split_microbatches(c, m, batch_axes), ctx)
        forward = [(i, i + 1) for i in range(stages - 1)]

        def tick(carry, t):
            held, outputs = carry
            fresh = lax.dynamic_index_in_dim(micro, jnp.minimum(t, m - 1), keepdims=False)
            working = _microbatch(micro_ctx, jnp.clip(t - stage, 0, m - 1))  # stage s: t - s
            out = _apply(stage_fn, params, jnp.where(stage == 0, fresh, held), working)
            done = t - (stages - 1)  # the microbatch the last stage finishes at this tick
            store = (stage == stages - 1) & (done >= 0)
            outputs = jnp.where(store, lax.dynamic_update_index_in_dim(
                outputs, out, jnp.maximum(done, 0), 0), outputs)
            return (lax.ppermute(out, axis, forward), outputs), None

        init = _varying((jnp.zeros_like(micro[0]), jnp.zeros_like(micro)), axis)
        (_, outputs), _ = lax.scan(tick, init, jnp.arange(m + stages - 1))
        # only the last stage holds the results: share them with every stage
        outputs = lax.psum(jnp.where(stage == stages - 1, outputs, 0), axis)
        return _join_microbatches(outputs)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P()), out_specs=P(),
                         axis_names={axis})(stacked_params, x, context)


# ---------------------------------------------------------------------------------------------
# 1F1B


def schedule_1f1b(stages: int, microbatches: int) -> np.ndarray:
    """The 1F1B schedule as a table (units, stages, 2) of (operation, microbatch).

    Each stage runs a fixed program: S - s - 1 warm-up forwards, then one forward and one
    backward in turn, then the remaining backwards (PyTorch's `Schedule1F1B`, Narayanan et al.
    2021); the last stage does its forward, the loss and its backward as one operation (LAST).
    At each unit a stage does its next operation if what it needs was produced at an earlier unit
    (a ppermute takes one unit), else waits. So stage s holds at most S - s microbatches' inputs,
    and the schedule takes 2 (M + S - 1) - 2 units, GPipe's forward-then-backward 2 (M + S - 1).
    """
    s_count, m = stages, microbatches
    programs = []
    for s in range(s_count):
        if s == s_count - 1:
            programs.append([(LAST, k) for k in range(m)])
            continue
        warmup = min(s_count - s - 1, m)
        program = [(FORWARD, k) for k in range(warmup)]
        for k in range(m):
            if warmup + k < m:
                program.append((FORWARD, warmup + k))
            program.append((BACKWARD, k))
        programs.append(program)
    position = [0] * s_count
    f_done: dict[tuple[int, int], int] = {}
    b_done: dict[tuple[int, int], int] = {}
    rows = []
    unit = 0
    while any(position[s] < len(programs[s]) for s in range(s_count)):
        row = []
        for s in range(s_count):
            if position[s] == len(programs[s]):
                row.append((IDLE, 0))
                continue
            op, k = programs[s][position[s]]
            if op == BACKWARD:
                ready = b_done.get((k, s + 1), unit) < unit
            else:
                ready = s == 0 or f_done.get((k, s - 1), unit) < unit
            row.append((op, k) if ready else (IDLE, 0))
        for s, (op, k) in enumerate(row):
            position[s] += op != IDLE
            if op in (FORWARD, LAST):
                f_done[(k, s)] = unit
            if op in (BACKWARD, LAST):
                b_done[(k, s)] = unit
        rows.append(row)
        unit += 1
        if unit > 4 * (m + s_count) + 8:
            raise AssertionError("the 1F1B schedule does not finish")  # a bug, not bad input
    return np.asarray(rows, dtype=np.int32)


def _receipts(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unit and stage, the microbatch whose activation arrives from the stage before
    and whose gradient arrives from the stage after (-1: nothing)."""
    units, stages, _ = table.shape
    from_before = np.full((units, stages), -1, np.int32)
    from_after = np.full((units, stages), -1, np.int32)
    for u in range(units):
        for s in range(stages):
            op, k = table[u, s]
            if op == FORWARD and s + 1 < stages:
                from_before[u, s + 1] = k
            if op in (BACKWARD, LAST) and s > 0:
                from_after[u, s - 1] = k
    return from_before, from_after


def peak_in_flight(table: np.ndarray) -> list[int]:
    """Per stage, the most microbatches whose input it holds at once (forward done, backward not)."""
    stages = table.shape[1]
    peaks = []
    for s in range(stages):
        live = peak = 0
        for op, _ in table[:, s]:
            live += op == FORWARD
            live -= op == BACKWARD
            peak = max(peak, live + (op == LAST))
        peaks.append(int(peak))
    return peaks


def pipeline_loss_1f1b(stage_fn: Callable[..., jax.Array],
                       head_loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
                       stacked_params: Any, head_params: Any, x: jax.Array, targets: Any, *,
                       mesh: Mesh, num_microbatches: int, axis: str = PIPELINE_AXIS,
                       batch_axes: Sequence[str] = ("data",), context: Any = None) -> jax.Array:
    """The mean over microbatches of `head_loss_fn(head_params, stages(x_k), targets_k)`, run as a
    1F1B pipeline; differentiable in `stacked_params`, `head_params` and `x` (the schedule
    computes the gradients while it runs; the backward pass only scales them). With a `context`
    (see `pipeline_call`) the stages run `stage_fn(params_s, h, context_k)`; the head does not
    see it, and neither it nor `targets` is differentiated."""
    batch_axes = tuple(a for a in batch_axes if a != axis)
    _check(mesh, axis, batch_axes, stacked_params, x, num_microbatches)
    _check_context(context, x)
    stages, m = mesh.shape[axis], num_microbatches
    table = schedule_1f1b(stages, m)
    from_before, from_after = _receipts(table)
    xs = tuple(jnp.asarray(a) for a in (table[..., 0], table[..., 1], from_before, from_after))

    def local(params, head, h, tgt, ctx):
        params = jax.tree.map(lambda p: p[0], params)
        stage = lax.axis_index(axis)
        micro_x = _split_microbatches(h, m, batch_axes)
        micro_t = jax.tree.map(lambda t: _split_microbatches(t, m, batch_axes), tgt)
        micro_ctx = jax.tree.map(lambda c: _split_microbatches(c, m, batch_axes), ctx)
        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        slots = jnp.zeros((stages, *micro_x.shape[1:]), micro_x.dtype)

        def unit(carry, row):
            inbox_f, inbox_b, g_params, g_head, loss, dx_out = carry
            op, k, before, after = (r[stage] for r in row)
            h_in = jnp.where(stage == 0, micro_x[k], inbox_f[k % stages])
            t_k = jax.tree.map(lambda t: t[k], micro_t)
            c_k = jax.tree.map(lambda c: c[k], micro_ctx)  # closed over: not differentiated
            # One program for every stage and operation, masked, rather than a `lax.switch` on
            # the operation: the stage's collectives (FSDP gathers, tensor-parallel reductions)
            # must run in the same order on every device of a stage, and XLA:CPU runs the
            # collectives of a conditional's branch in no fixed order (it deadlocked 1 run in 4).
            # The price: a forward unit also pays for a backward.
            y, stage_vjp = jax.vjp(lambda p, h_: _apply(stage_fn, p, h_, c_k), params, h_in)
            mean = lambda hp, y_: head_loss_fn(hp, y_, t_k) / m  # noqa: E731
            value, (d_head, d_y) = jax.value_and_grad(mean, argnums=(0, 1))(head, y)
            last, backward = op == LAST, op == BACKWARD
            cotangent = jnp.where(last, d_y, jnp.where(backward, inbox_b[k % stages], 0))
            d_params, d_h = stage_vjp(cotangent.astype(y.dtype))
            keep = lambda on, tree: jax.tree.map(  # noqa: E731
                lambda a: jnp.where(on, a, jnp.zeros_like(a)), tree)
            g_params = jax.tree.map(jnp.add, g_params, keep(last | backward, d_params))
            g_head = jax.tree.map(jnp.add, g_head, keep(last, d_head))
            loss = loss + jnp.where(last, value, 0.0).astype(jnp.float32)
            first_backward = (stage == 0) & (last | backward)
            dx_out = jnp.where(first_backward,
                               lax.dynamic_update_index_in_dim(dx_out, d_h, k, 0), dx_out)
            sent_f = lax.ppermute(keep(op == FORWARD, y), axis,
                                  [(s, s + 1) for s in range(stages - 1)])
            sent_b = lax.ppermute(keep(last | backward, d_h), axis,
                                  [(s, s - 1) for s in range(1, stages)])
            inbox_f = jnp.where(before >= 0, lax.dynamic_update_index_in_dim(
                inbox_f, sent_f, jnp.maximum(before, 0) % stages, 0), inbox_f)
            inbox_b = jnp.where(after >= 0, lax.dynamic_update_index_in_dim(
                inbox_b, sent_b, jnp.maximum(after, 0) % stages, 0), inbox_b)
            return (inbox_f, inbox_b, g_params, g_head, loss, dx_out), None

        init = (slots, slots, zeros(params), zeros(head), jnp.zeros((), jnp.float32),
                jnp.zeros_like(micro_x))
        (_, _, g_params, g_head, loss, dx), _ = lax.scan(unit, init, xs)
        return (lax.psum(loss, axis), jax.tree.map(lambda g: g[None], g_params),
                lax.psum(g_head, axis), _join_microbatches(lax.psum(dx, axis)))

    run = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P(), P(), P()),
                        out_specs=(P(), P(axis), P(), P()), axis_names={axis}, check_vma=False)

    @jax.custom_vjp
    def loss_of(params, head, h, tgt, ctx):
        return run(params, head, h, tgt, ctx)[0]

    def forward(params, head, h, tgt, ctx):
        loss, g_params, g_head, d_h = run(params, head, h, tgt, ctx)
        return loss, (g_params, g_head, d_h, tgt, ctx)

    def backward(saved, g):
        g_params, g_head, d_h, tgt, ctx = saved
        scale = lambda tree: jax.tree.map(lambda a: a * g.astype(a.dtype), tree)  # noqa: E731
        return (scale(g_params), scale(g_head), scale(d_h), _never_differentiated(tgt),
                _never_differentiated(ctx))

    loss_of.defvjp(forward, backward)
    return loss_of(stacked_params, head_params, x, targets, context)


# ---------------------------------------------------------------------------------------------
# A model's layer stack as pipeline stages (what a trainer puts into `jaxdist.core.layout`)


def as_stages(stacked: Any, stages: int) -> Any:
    """A stack of L layers (leading axis L) -> S stages of L / S consecutive layers."""
    layers = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    (count,) = layers
    if count % stages:
        raise UsageError(f"the model's {count} layers do not split into {stages} pipeline "
                         f"stages; choose a pipeline size that divides {count}")
    return jax.tree.map(lambda x: x.reshape(stages, count // stages, *x.shape[1:]), stacked)


def stack_runners(mesh: Mesh, *, microbatches: int, schedule: str = "gpipe",
                  batch_axes: Sequence[str] = ("data", "fsdp"), axis: str = PIPELINE_AXIS
                  ) -> tuple[Callable, Callable | None]:
    """(run_layers, layers_then_loss) for `jaxdist.core.layout.Layout` on a pipelined mesh."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown pipeline schedule {schedule!r}; choose one of "
                         f"{', '.join(SCHEDULES)}")
    stages = mesh.shape[axis]
    options = dict(mesh=mesh, num_microbatches=microbatches, axis=axis, batch_axes=batch_axes)

    def run_layers(layer_fn, stacked, h, *, context=None):
        stage_fn = functools.partial(scan_layers, layer_fn)  # (params, h[, context])
        return pipeline_call(stage_fn, as_stages(stacked, stages), h, context=context, **options)

    def layers_then_loss(layer_fn, head_loss_fn, stacked, head_params, h, targets, *,
                         context=None):
        stage_fn = functools.partial(scan_layers, layer_fn)
        return pipeline_loss_1f1b(stage_fn, head_loss_fn, as_stages(stacked, stages),
                                  head_params, h, targets, context=context, **options)

    return run_layers, (layers_then_loss if schedule == "1f1b" else None)
