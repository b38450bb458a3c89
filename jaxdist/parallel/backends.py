"""The mapped layouts of one data-parallel train step; they differ only in layout and reduction.
(`jit`, the fourth data-parallel strategy, is the rules layout with replicated state: see
`jaxdist.parallel.sharded`.) The strategy values of `jaxdist.parallel.strategies` build them
through `mapped_layout`, each with its own backend:

- `shard_map_backend`: state replicated; each device runs the step on its shard and
  `lax.pmean`s gradients (or hands them to a gradient reducer).
- `pmap_backend`: the classic per-device program; state carries a leading replica axis.
- `local_sgd_backend`: each replica steps alone on its shard (no gradient all-reduce) and every H
  steps parameters are averaged, theta = mean_i theta_i. Optimizer state stays per replica (each
  keeps its own momentum / Adam moments, as in local SGD); `average_opt_state=True` averages it
  as well. With an outer optimizer it is DiLoCo: the averaged movement is an outer gradient.
  Its canonical state is the replica mean; checkpoints keep each replica's state beside it.

Every backend exposes the same four operations, so the loop, tests and checkpoints never branch
on the strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.step import (
    EvalFn,
    LossFn,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    with_batch_stats_over,
)
from jaxdist.parallel.mesh import DATA_AXIS, batch_sharded, replicated

BatchStats = Literal["global", "per_device"]


def pmean_floats(tree: Any, axis_name: str = DATA_AXIS) -> Any:
    """`lax.pmean` of every floating leaf, as one flat buffer per dtype (a bucket, as PyTorch's
    DDP does); integer leaves (counters) are equal on all replicas.

    One buffer, not one collective per leaf: across processes XLA:CPU runs each operand of an
    all-reduce as its own gloo all-reduce, and ten of them cost a 2-process CNN step 20-40 ms
    where one flat all-reduce costs 2-10 (docs/performance.md, #14). The values are the same:
    a mean is elementwise."""
    leaves, treedef = jax.tree.flatten(tree)
    buckets: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            buckets.setdefault(jnp.dtype(x.dtype), []).append(i)
    out = list(leaves)
    for members in buckets.values():
        flat = lax.pmean(jnp.concatenate([jnp.ravel(leaves[i]) for i in members]), axis_name)
        offset = 0
        for i in members:
            size = leaves[i].size
            out[i] = flat[offset:offset + size].reshape(leaves[i].shape)
            offset += size
    return treedef.unflatten(out)


def _stack(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def _first(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _mean_floats(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.mean(0).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x[0], tree
    )


@dataclasses.dataclass
class Backend:
    """A compiled step and the layout it expects (the rules layout's too: its `place` lays the
    state out by the rules, its `canonical` is the identity).

    Attributes:
        name: the strategy.
        mesh: the mesh it runs on (the mapped layouts': the 1-D data mesh).
        place: canonical (single-copy) TrainState -> the backend's layout on the mesh.
        step: (placed state, placed batch) -> (placed state, metrics); jitted, donates the state.
        canonical: placed state -> one replicated TrainState (for evaluation and checkpoints).
        stacked_batch: whether batches carry a leading device axis (pmap).
        per_replica: whether the placed state holds one differing state per replica, stacked on
            a leading axis split over the data axis (local SGD): what `canonical` averages away,
            and what checkpoints keep beside it for an exact resume.
    """

    name: str
    mesh: Mesh
    place: Callable[[TrainState], Any]
    step: Callable[[Any, Any], tuple[Any, dict]]
    canonical: Callable[[Any], TrainState]
    stacked_batch: bool = False
    per_replica: bool = False


@dataclasses.dataclass
class StepLayout:
    """What a strategy value builds for `Trainer`: its backend, and how state and batches are laid
    out. The rules layout (`jaxdist.parallel.sharded.rules_layout`) fills every field; the mapped
    ones leave `rules`, the shardings of the state and `abstract_state` None.

    Attributes:
        graphdef: the model's structure (`nnx.split`).
        backend: the compiled step and the state's placement.
        batch_sharding: how a global batch is laid out.
        batch_ways: how many pieces the batch splits into.
        initial_state: () -> the initial state, placed.
        abstract_state: () -> its ShapeDtypeStructs with shardings, without allocating it.
        eval_step: (params, rest, batch) -> metric sums, or None without an `eval_fn`.
    """

    graphdef: Any
    backend: Backend
    batch_sharding: NamedSharding
    batch_ways: int
    initial_state: Callable[[], Any]
    abstract_state: Callable[[], TrainState] | None = None
    eval_step: Callable | None = None
    rules: Any = None  # jaxdist.parallel.rules.Rules
    param_shardings: Any = None
    grad_shardings: Any = None
    state_shardings: TrainState | None = None


def mapped_layout(model: nnx.Module | Callable[[], nnx.Module], tx: optax.GradientTransformation,
                  loss_fn: LossFn, mesh: Mesh, eval_fn: EvalFn | None, step_options: dict,
                  backend: Callable[[Mesh, Callable[[Callable], Callable]], Backend], *,
                  batch_stats: BatchStats, comm_init: Callable[[Any], Any] | None = None,
                  grad_reduce: Callable | None = None) -> StepLayout:
    """The step of `model` (or a builder of it) run by each replica over the data axis of `mesh`.

    `backend(mesh, train_step_with)` lays it out (`shard_map_backend`, ...), where
    `train_step_with(reduce)` is the shared pure train step with `reduce` averaging over replicas
    (`jaxdist.core.step.make_train_step`, `replica_axis`). `batch_stats` "global": BatchNorm
    averages its statistics over the replicas, as one device over the global batch would;
    "per_device": each replica's own. `comm_init(params)` builds the state's `comm` (a gradient
    reducer's, stacked per replica; DiLoCo's `diloco_init`), `grad_reduce` the reducer's update.
    """
    model = model if isinstance(model, nnx.Module) else model()
    graphdef, initial = init_state(model, tx, comm_init)
    replica_graphdef = graphdef
    if batch_stats == "global":
        replica_graphdef = with_batch_stats_over(graphdef, initial, DATA_AXIS)

    def train_step_with(reduce):
        return make_train_step(replica_graphdef, loss_fn, tx, reduce, grad_reduce=grad_reduce,
                               replica_axis=DATA_AXIS, **step_options)

    built = backend(mesh, train_step_with)
    # kept on the host: placing it always copies, so donating a placed state never frees it
    host_state = jax.device_get(initial)
    eval_step = None
    if eval_fn is not None:
        rep = replicated(mesh)
        eval_step = jax.jit(make_eval_step(graphdef, eval_fn),
                            in_shardings=(rep, rep, batch_sharded(mesh)), out_shardings=rep)
    return StepLayout(graphdef, built, batch_sharded(mesh), mesh.size,
                      lambda: built.place(host_state), eval_step=eval_step)


def stacked_init(init: Callable[[Any], Any], replicas: int) -> Callable[[Any], Any]:
    """`init(params)` once per replica, stacked on a leading axis (a gradient reducer's state)."""
    return lambda params: jax.tree.map(lambda x: np.broadcast_to(x, (replicas, *x.shape)),
                                       init(params))


def shard_map_backend(mesh: Mesh, train_step_with: Callable[[Callable], Callable]) -> Backend:
    """State replicated, except `comm` (the gradient reducer's state): one slice per replica,
    stacked on a leading axis split over the data axis."""
    train_step = train_step_with(pmean_floats)
    add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

    def local_step(state: TrainState, batch):
        state, metrics = train_step(state._replace(comm=_first(state.comm)), batch)
        return state._replace(comm=add_axis(state.comm)), metrics

    specs = TrainState(P(), P(), P(), P(), P(DATA_AXIS))
    mapped = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(specs, P(DATA_AXIS)),
        out_specs=(specs, P()),
        check_vma=False,  # else grads of replicated params arrive psum-med already
    )
    step = jax.jit(mapped, donate_argnums=0)
    rep, per_replica = replicated(mesh), batch_sharded(mesh)

    def place(state: TrainState) -> TrainState:
        comm = jax.device_put(state.comm, per_replica)
        return jax.device_put(state._replace(comm=()), rep)._replace(comm=comm)

    return Backend("shard_map", mesh, place, step, lambda s: s)


def _stacked_placement(mesh: Mesh) -> Callable[[TrainState], TrainState]:
    n = mesh.size
    return jax.jit(lambda s: _stack(s, n), out_shardings=batch_sharded(mesh))


def pmap_backend(mesh: Mesh, train_step_with: Callable[[Callable], Callable]) -> Backend:
    step = jax.pmap(
        train_step_with(pmean_floats),
        axis_name=DATA_AXIS,
        devices=list(mesh.devices.flat),
        donate_argnums=0,
    )
    canonical = jax.jit(_first, out_shardings=replicated(mesh))
    return Backend("pmap", mesh, _stacked_placement(mesh), step, canonical, stacked_batch=True)


class OuterState(NamedTuple):
    """DiLoCo's global parameters (where every replica restarts after a sync) and the outer
    optimizer's state."""

    anchor: Any
    outer: Any


def diloco_init(outer: optax.GradientTransformation) -> Callable[[Any], OuterState]:
    """`comm_init` for local SGD with an outer optimizer."""
    return lambda params: OuterState(params, outer.init(params))


def local_sgd_backend(mesh: Mesh, train_step_with: Callable[[Callable], Callable], *,
                      every: int, average_opt_state: bool = False,
                      outer: optax.GradientTransformation | None = None) -> Backend:
    """Parameters averaged every `every` steps; with `outer` (DiLoCo) the state's `comm` must hold
    `diloco_init(outer)(params)`."""
    local_step = train_step_with(lambda tree: tree)

    def outer_step(state: TrainState, mean_params) -> TrainState:
        """DiLoCo: the replicas' mean movement away from the anchor is the outer gradient."""
        anchor, outer_state = state.comm
        delta = jax.tree.map(lambda a, m: a - m, anchor, mean_params)
        updates, outer_state = outer.update(delta, outer_state, anchor)
        anchor = optax.apply_updates(anchor, updates)
        return state._replace(params=anchor, comm=OuterState(anchor, outer_state))

    def average(state: TrainState) -> TrainState:
        mean_params = pmean_floats(state.params)
        if outer is None:
            state = state._replace(params=mean_params)
        else:
            state = outer_step(state, mean_params)
        state = state._replace(rest=pmean_floats(state.rest))
        if average_opt_state:
            state = state._replace(opt_state=pmean_floats(state.opt_state))
        return state

    def replica_step(stacked: TrainState, batch):
        state, metrics = local_step(_first(stacked), batch)
        state = lax.cond(state.step % every == 0, average, lambda s: s, state)
        add_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)
        return add_axis(state), add_axis(metrics)

    mapped = jax.shard_map(
        replica_step,
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
        check_vma=False,  # the averaging branch is invariant, the other is not: both are fine
    )
    step = jax.jit(mapped, donate_argnums=0)
    canonical = jax.jit(_mean_floats, out_shardings=replicated(mesh))
    return Backend("local_sgd", mesh, _stacked_placement(mesh), step, canonical, per_replica=True)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process, also when other processes hold parts of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_metrics(metrics: dict) -> dict[str, float]:
    """Device metrics -> Python floats, averaging a per-replica axis where one exists."""
    return {k: float(np.mean(to_host(v))) for k, v in metrics.items()}
