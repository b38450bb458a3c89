"""One definition of the training and evaluation step, shared by every parallel backend.

A backend differs only in how gradients (and metrics) are reduced across replicas: XLA does it for
`jax.jit` with sharded inputs, `lax.pmean` does it under `pmap`/`shard_map`, and local SGD does not
reduce gradients at all. So the step takes that reduction as an argument.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

from jaxdist.errors import UsageError

Batch = Any
Metrics = dict[str, jax.Array]
# loss_fn(model, batch) -> loss, or (loss, metrics): the mean over the examples it is given.
LossFn = Callable[[nnx.Module, Batch], "jax.Array | tuple[jax.Array, Metrics]"]
# eval_fn(model, batch) -> metrics summed over the batch's examples (padding masked out).
EvalFn = Callable[[nnx.Module, Batch], Metrics]
Reduce = Callable[[Any], Any]
# grad_reduce(grads, comm_state) -> (grads averaged over replicas, comm_state)
GradReduce = Callable[[Any, Any], tuple[Any, Any]]


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree.

    `rest` holds the model's non-parameter state (batch statistics, RNG counters); it is empty for
    the CNN. `comm` holds the gradient reducer's state (error-feedback residuals, PowerSGD's
    factors, DiLoCo's outer optimizer), one copy per replica; empty for plain averaging.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    comm: Any = ()


def path_name(path) -> str:
    """'opt_state/0/mu/fc1/kernel' for a key path into a state, whether it reaches the arrays
    through nnx Variables (a `.value` attribute) or through orbax's metadata dicts."""
    names = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return "/".join(n for n in names if n != "value")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable parameters, everything else)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               comm_init: Callable[[nnx.State], Any] | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The model's structure and its initial train state (on the host or default device).

    `comm_init(params)` builds one replica's gradient-reducer state (see `jaxdist.comm`).
    """
    graphdef, params, rest = split_model(model)
    comm = comm_init(params) if comm_init is not None else ()
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), comm)
    return graphdef, state


def _as_loss_and_metrics(out) -> tuple[jax.Array, Metrics]:
    if isinstance(out, tuple):
        loss, metrics = out
        return loss, dict(metrics)
    return out, {}


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    reduce: Reduce = lambda tree: tree,
    *,
    skip_nonfinite: bool = True,
    grad_reduce: GradReduce | None = None,
    microbatches: int = 1,
    replica_axis: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `(state, batch) -> (state, metrics)`.

    `reduce` averages a pytree over data-parallel replicas (identity when the program is already
    global). It is applied to gradients, metrics and the non-parameter model state, unless
    `grad_reduce(grads, comm_state) -> (grads, comm_state)` is given: then that reduces the
    gradients (in another dtype, compressed; see `jaxdist.comm`) and `reduce` the rest.

    With `microbatches` M > 1 the batch is split into M equal parts whose gradients are summed
    one after another (`_one_after_another`) before the one reduction: gradient accumulation, M
    times less activation memory, the same update as the whole batch.

    With `skip_nonfinite`, a step whose reduced loss or gradients hold a NaN/Inf leaves params,
    optimizer state and model state as they were (only the step counter moves on) and reports
    `metrics["nonfinite"] = 1`. The test runs after the reduction, so every replica skips alike.
    It is done here rather than with `optax.apply_if_finite` because batch statistics and other
    model state must be protected too.

    `replica_axis` names the mapped axis when each replica runs this step on its shard (shard_map,
    pmap, local SGD). The replica's index is then folded into the model's RNG keys for the
    forward pass, so dropout draws an independent mask on every replica, as it does for the
    examples of one global batch on one device; the keys kept in the state stay replicated.
    """

    def loss_with_rest(params, rest, batch):
        shared_keys = rest
        if replica_axis is not None:
            rest = fold_in_keys(rest, lax.axis_index(replica_axis))
        # copy: `rest` comes from outside the grad trace, and layers such as BatchNorm mutate it
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss, metrics = _as_loss_and_metrics(loss_fn(model, batch))
        _, _, new_rest = split_model(model)
        if replica_axis is not None:
            new_rest = jax.tree.map(lambda new, old: old if is_prng_key(old) else new, new_rest,
                                    shared_keys)
        return loss, (metrics, new_rest)

    grad_fn = jax.value_and_grad(loss_with_rest, has_aux=True)

    def accumulated(params, rest, batch):
        """(loss, metrics, rest, grads) of the batch, summed over microbatches then averaged."""
        if microbatches == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, batch)
            return loss, metrics, rest, grads
        parts = jax.tree.map(lambda x: _split_rows(x, microbatches), batch)
        first = jax.tree.map(lambda x: x[0], parts)
        (loss, (metrics, _)), grads = jax.eval_shape(grad_fn, params, rest, first)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss, metrics, grads))

        def add(carry, part):
            rest, sums = carry
            (loss, (metrics, rest)), grads = grad_fn(params, rest, part)
            return (rest, jax.tree.map(jnp.add, sums, (loss, metrics, grads))), None

        rest, sums = _one_after_another(add, (rest, zeros), parts, microbatches)
        loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, sums)
        return loss, metrics, rest, grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        loss, metrics, rest, grads = accumulated(state.params, state.rest, batch)
        metrics = {"loss": loss, **metrics}
        comm = state.comm
        if grad_reduce is None:
            grads, rest, metrics = reduce((grads, rest, metrics))
        else:
            grads, comm = grad_reduce(grads, comm)
            rest, metrics = reduce((rest, metrics))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, rest, opt_state, comm)
        if skip_nonfinite:
            finite = _all_finite((metrics["loss"], grads))
            new = _keep_if(finite, new, state._replace(step=new.step))
            metrics = {**metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new, metrics

    return train_step


def is_prng_key(x: Any) -> bool:
    """Whether `x` is an array of typed PRNG keys (which `where`, numpy and `+` reject)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def fold_in_keys(tree: Any, data: jax.Array) -> Any:
    """Every PRNG key in `tree` folded with `data` (other leaves as they are)."""
    return jax.tree.map(lambda x: jax.random.fold_in(x, data) if is_prng_key(x) else x, tree)


def with_batch_stats_over(graphdef: nnx.GraphDef, state: TrainState,
                          axis_name: str) -> nnx.GraphDef:
    """`graphdef` whose BatchNorm layers (those without an axis of their own) average their batch
    statistics over `axis_name`: per replica, the statistics of the whole global batch."""
    model = nnx.merge(graphdef, state.params, state.rest)
    # nnx.iter_modules(m) in current flax; older ones (the GPU machine's) have only the method
    modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    for _, module in modules:
        if isinstance(module, nnx.BatchNorm) and module.axis_name is None:
            module.axis_name = axis_name
    return split_model(model)[0]


def _one_after_another(add: Callable, carry: Any, parts: Any, count: int) -> Any:
    """`add` folded over the `count` microbatches stacked in `parts`, one after another.

    `lax.scan` everywhere but on CPU. There XLA gives a convolution in a loop body whose kernel
    needs another layout (the input gradient's) its naive loop-nest kernel instead of oneDNN's or
    Eigen's: the CNN step at batch 512 in 4 microbatches ran 240 img/s against 12k for the whole
    batch (docs/performance.md, #19). So on CPU the loop is unrolled, and each microbatch's input
    passes an optimization barrier together with the running sums: XLA cannot start a microbatch
    before the previous one is summed, and activation memory stays one microbatch's, as in a scan.
    """
    if jax.default_backend() != "cpu":
        return lax.scan(add, carry, parts)[0]
    for j in range(count):
        part, carry = lax.optimization_barrier((jax.tree.map(lambda x: x[j], parts), carry))
        carry, _ = add(carry, part)
    return carry


def _split_rows(x: jax.Array, parts: int) -> jax.Array:
    if x.shape[0] % parts:
        raise UsageError(f"a batch of {x.shape[0]} rows per replica does not split into {parts} "
                         f"microbatches")
    # strided: microbatch j takes rows j, j + parts, ...; a batch split over devices in blocks
    # keeps every microbatch spread over all of them (no resharding under jit)
    return x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `ok`, else `old`, leaf by leaf (PRNG keys, which `where` rejects, move on)."""
    def pick(n, o):
        return n if is_prng_key(n) else jnp.where(ok, n, o)

    return jax.tree.map(pick, new, old)


def make_eval_step(
    graphdef: nnx.GraphDef, eval_fn: EvalFn
) -> Callable[[nnx.State, nnx.State, Batch], Metrics]:
    """A pure `(params, rest, batch) -> summed metrics`; it never changes the state."""

    def eval_step(params, rest, batch):
        return eval_fn(nnx.merge(graphdef, params, rest), batch)

    return eval_step
