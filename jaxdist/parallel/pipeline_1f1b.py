"""1F1B: a pipeline that owns the loss and interleaves each microbatch's backward with the next
forwards, so a stage keeps a bounded number of microbatches' activations whatever M.

With S stages and M microbatches, stage s runs the forward of microbatch k at tick k + s and its
backward at tick k + 2 (S - 1) - s; the last stage runs its forward, the loss and its backward in
one tick. Every device runs one program per tick (no conditional, see `jaxdist.parallel.pipeline`)
and the ticks fall into three scans:

- S - 1 warm-up ticks: a forward (and a `lax.ppermute` of its output to the next stage);
- M steady ticks: a forward and a backward, each of a real microbatch except on the stages
  that are still filling or already draining;
- S - 1 cool-down ticks: a backward (and a `lax.ppermute` of its input gradient back).

So a step computes M + S - 1 forwards and M + S - 1 backwards per stage, GPipe's count. A
forward saves its pullback's residuals (`jax.vjp`) in one of min(M, 2 S - 1) slots until its
backward: stage s holds 2 (S - s) - 1 microbatches at most, never M. The backward uses the saved
residuals, it does not recompute the forward. Residuals that are the stage's parameters
themselves are not copied into the slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdist.parallel.pipeline import (PIPELINE_AXIS, apply_stage, check_inputs,
                                       join_microbatches, microbatch, put_microbatch,
                                       split_microbatches)


def ticks_1f1b(stages: int, microbatches: int) -> tuple[int, int, int]:
    """(warm-up, steady, cool-down) ticks: forward only, forward and backward, backward only."""
    return stages - 1, microbatches, stages - 1


def forward_microbatch(tick: Any, stage: Any) -> Any:
    """The microbatch whose forward stage s runs at a tick (valid in [0, M))."""
    return tick - stage


def backward_microbatch(tick: Any, stage: Any, stages: int) -> Any:
    """The microbatch whose backward stage s runs at a tick (valid in [0, M)): its gradient left
    the stage after at the tick before; the last stage's is its forward's."""
    return tick - 2 * (stages - 1) + stage


def schedule_1f1b(stages: int, microbatches: int) -> list[list[tuple[int | None, int | None]]]:
    """The schedule as a table: per tick, per stage, (forward microbatch, backward microbatch),
    None where that half of the tick serves no microbatch."""
    valid = lambda k: k if 0 <= k < microbatches else None  # noqa: E731
    return [[(valid(forward_microbatch(t, s)), valid(backward_microbatch(t, s, stages)))
             for s in range(stages)] for t in range(sum(ticks_1f1b(stages, microbatches)))]


def residual_slots(stages: int, microbatches: int) -> int:
    """Microbatches whose residuals a stage keeps at once: stage 0 from the forward of k at
    tick k to its backward at tick k + 2 (S - 1)."""
    return min(microbatches, 2 * stages - 1)


@dataclasses.dataclass(frozen=True)
class _Pullback:
    """How a stage's `jax.vjp` pullback is rebuilt from saved residuals: its tree, and for each
    of its leaves the index of the parameter leaf it is (not saved) or None (saved)."""

    treedef: Any
    shared: tuple[int | None, ...]

    def split(self, leaves: list[Any]) -> list[Any]:
        return [leaf for leaf, i in zip(leaves, self.shared) if i is None]

    def rebuild(self, params: Any, saved: Sequence[Any]) -> Callable:
        params, saved = jax.tree.leaves(params), iter(saved)
        return jax.tree.unflatten(self.treedef, [params[i] if i is not None else next(saved)
                                                 for i in self.shared])


def _forward(stage_fn: Callable, params: Any, h: jax.Array, ctx: Any
             ) -> tuple[jax.Array, list[Any], _Pullback]:
    """The stage's output, its pullback's leaves and their structure."""
    y, pullback = jax.vjp(lambda p, x: apply_stage(stage_fn, p, x, ctx), params, h)
    leaves, treedef = jax.tree.flatten(pullback)
    ps = jax.tree.leaves(params)
    shared = tuple(next((i for i, p in enumerate(ps) if leaf is p), None) for leaf in leaves)
    return y, leaves, _Pullback(treedef, shared)


def forward_saving(stage_fn: Callable, params: Any, h: jax.Array, ctx: Any
                   ) -> tuple[jax.Array, list[Any], _Pullback]:
    """`stage_fn`'s output, the residuals its backward needs other than `params`, and how to
    rebuild its pullback from them (`_Pullback.rebuild(params, saved)`)."""
    y, leaves, pullback = _forward(stage_fn, params, h, ctx)
    return y, pullback.split(leaves), pullback


def _pullback_of(stage_fn: Callable, params: Any, h: jax.Array, ctx: Any
                 ) -> tuple[_Pullback, list[jax.ShapeDtypeStruct]]:
    """The pullback's structure and the shapes of the residuals it saves, traced abstractly."""
    found = []

    def probe(params, h, ctx):
        _, saved, pullback = forward_saving(stage_fn, params, h, ctx)
        found.append(pullback)
        return saved

    saved = jax.eval_shape(probe, params, h, ctx)
    return found[0], saved


def pipeline_loss_1f1b(stage_fn: Callable[..., jax.Array],
                       head_loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
                       stacked_params: Any, head_params: Any, x: jax.Array, targets: Any, *,
                       mesh: Mesh, num_microbatches: int, axis: str = PIPELINE_AXIS,
                       batch_axes: Sequence[str] = ("data",), context: Any = None,
                       unroll: bool = False) -> jax.Array:
    """The mean over microbatches of `head_loss_fn(head_params, stages(x_k), targets_k)`, run as a
    1F1B pipeline; differentiable in `stacked_params`, `head_params` and `x` (the schedule
    computes the gradients while it runs; the backward pass only scales them). With a `context`
    (see `jaxdist.parallel.pipeline.pipeline_call`) the stages run
    `stage_fn(params_s, h, context_k)`; the head does not see it, and neither it nor `targets` is
    differentiated. `unroll`: compile every tick on its own (see `pipeline_call`)."""
    batch_axes = tuple(a for a in batch_axes if a != axis)
    check_inputs(mesh, axis, batch_axes, stacked_params, x, num_microbatches, context)
    stages, m = mesh.shape[axis], num_microbatches
    warmup, steady, cooldown = ticks_1f1b(stages, m)
    slots = residual_slots(stages, m)
    ahead = [(s, s + 1) for s in range(stages - 1)]
    behind = [(s, s - 1) for s in range(1, stages)]

    def local(params, head, h, tgt, ctx):
        params = jax.tree.map(lambda p: p[0], params)
        stage = lax.axis_index(axis)
        last = stage == stages - 1
        micro_x = split_microbatches(h, m, batch_axes)
        micro_t = jax.tree.map(lambda t: split_microbatches(t, m, batch_axes), tgt)
        micro_ctx = jax.tree.map(lambda c: split_microbatches(c, m, batch_axes), ctx)
        pullback, shapes = _pullback_of(stage_fn, params, micro_x[0], microbatch(micro_ctx, 0))

        def forward(t, inbox, saved):
            """The forward of microbatch t - s: its output, and the slots with its residuals."""
            k = forward_microbatch(t, stage)
            on, k = (k >= 0) & (k < m), jnp.clip(k, 0, m - 1)
            h_in = jnp.where(stage == 0, micro_x[k], inbox)
            y, residuals, _ = forward_saving(stage_fn, params, h_in, microbatch(micro_ctx, k))
            saved = [put_microbatch(buf, k % slots, r, on) for buf, r in zip(saved, residuals)]
            return y, saved

        def backward(t, cotangent, grads, saved):
            """The backward of microbatch t - 2 (S - 1) + s: the parameter gradients added to
            `grads`, the input's gradient (stage 0: kept in `dx`, the others: sent back)."""
            g_params, dx = grads
            k = backward_microbatch(t, stage, stages)
            on, k = (k >= 0) & (k < m), jnp.clip(k, 0, m - 1)
            residuals = [lax.dynamic_index_in_dim(buf, k % slots, keepdims=False)
                         for buf in saved]
            d_params, d_h = pullback.rebuild(params, residuals)(cotangent)
            g_params = jax.tree.map(lambda g, d: g + jnp.where(on, d, 0), g_params, d_params)
            dx = put_microbatch(dx, k, d_h, on & (stage == 0))
            return d_h, (g_params, dx)

        def warm(carry, t):
            inbox, saved = carry
            y, saved = forward(t, inbox, saved)
            return (lax.ppermute(y, axis, ahead), saved), None

        def fused(carry, t):
            inbox, grad_in, saved, grads, g_head, loss = carry
            y, saved = forward(t, inbox, saved)
            k = jnp.clip(forward_microbatch(t, stage), 0, m - 1)  # the last stage's microbatch
            mean = lambda hp, y_: head_loss_fn(hp, y_, microbatch(micro_t, k)) / m  # noqa: E731
            value, (d_head, d_y) = jax.value_and_grad(mean, argnums=(0, 1))(head, y)
            g_head = jax.tree.map(lambda g, d: g + jnp.where(last, d, 0), g_head, d_head)
            loss = loss + jnp.where(last, value, 0.0).astype(jnp.float32)
            cotangent = jnp.where(last, d_y.astype(y.dtype), grad_in)
            d_h, grads = backward(t, cotangent, grads, saved)
            return (lax.ppermute(y, axis, ahead), lax.ppermute(d_h, axis, behind), saved,
                    grads, g_head, loss), None

        def cool(carry, t):
            grad_in, saved, grads = carry
            d_h, grads = backward(t, grad_in, grads, saved)
            return (lax.ppermute(d_h, axis, behind), saved, grads), None

        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
        saved = [jnp.zeros((slots, *s.shape), s.dtype) for s in shapes]
        grads = (zeros(params), jnp.zeros_like(micro_x))
        (inbox, saved), _ = lax.scan(warm, (jnp.zeros_like(micro_x[0]), saved),
                                     jnp.arange(warmup), unroll=unroll)
        carry = (inbox, jnp.zeros_like(micro_x[0]), saved, grads, zeros(head),
                 jnp.zeros((), jnp.float32))
        (_, grad_in, saved, grads, g_head, loss), _ = lax.scan(
            fused, carry, jnp.arange(warmup, warmup + steady), unroll=unroll)
        (_, _, (g_params, dx)), _ = lax.scan(
            cool, (grad_in, saved, grads), jnp.arange(warmup + steady, warmup + steady + cooldown),
            unroll=unroll)
        return (lax.psum(loss, axis), jax.tree.map(lambda g: g[None], g_params),
                lax.psum(g_head, axis), join_microbatches(lax.psum(dx, axis)))

    run = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P(), P(), P()),
                        out_specs=(P(), P(axis), P(), P()), axis_names={axis}, check_vma=False)

    @jax.custom_vjp
    def loss_of(params, head, h, tgt, ctx):
        return run(params, head, h, tgt, ctx)[0]

    def forward_pass(params, head, h, tgt, ctx):
        loss, g_params, g_head, d_h = run(params, head, h, tgt, ctx)
        return loss, (g_params, g_head, d_h, tgt, ctx)

    def backward_pass(saved, g):
        g_params, g_head, d_h, tgt, ctx = saved
        scale = lambda tree: jax.tree.map(lambda a: a * g.astype(a.dtype), tree)  # noqa: E731
        return (scale(g_params), scale(g_head), scale(d_h), _never_differentiated(tgt),
                _never_differentiated(ctx))

    loss_of.defvjp(forward_pass, backward_pass)
    return loss_of(stacked_params, head_params, x, targets, context)


def _never_differentiated(tree: Any) -> Any:
    """The zero cotangents of inputs the loss is not differentiated in (targets, context)."""
    return jax.tree.map(lambda t: np.zeros(t.shape, jax.dtypes.float0), tree)
