"""`DataParallel`: a user's NNX model, optax optimizer and loss become a data-parallel step."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from jaxdist.cluster.devices import select_devices
from jaxdist.errors import UsageError
from jaxdist.comm.reducers import GradReducer
from jaxdist.parallel.backends import Backend, diloco_init, make_backend, to_host
from jaxdist.parallel.mesh import (
    DATA_AXIS,
    batch_sharded,
    data_mesh,
    put_global_batch,
    replicated,
)
from jaxdist.train.step import (
    EvalFn,
    LossFn,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    with_batch_stats_over,
)


class DataParallel:
    """Data-parallel training of one model over a set of devices.

    Example:
        >>> dp = DataParallel(model, optax.adam(1e-3), loss_fn, strategy="shard_map")
        >>> state = dp.init()
        >>> for batch in batches:                 # numpy, this process's rows of the global batch
        ...     state, metrics = dp.step(state, batch)
        >>> dp.sync_model(state)                  # write the trained weights back into `model`

    Args:
        model: a Flax NNX module; its current weights are the starting point.
        tx: an optax optimizer.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, metrics)`, a mean over the batch.
        strategy: "jit", "shard_map", "pmap" or "local_sgd" (see `jaxdist.parallel.backends`).
        devices: a device count, a list of devices, or None for all devices.
        eval_fn: `eval_fn(model, batch) -> metrics summed over the batch` for `evaluate`.
        local_steps: for "local_sgd", average parameters every this many steps (H).
        average_opt_state: for "local_sgd", average the optimizer state too.
        skip_nonfinite: skip updates whose loss or gradients are not finite (see
            `jaxdist.train.step.make_train_step`); the step reports `metrics["nonfinite"]`.
        grad_reducer: for "shard_map", how gradients are averaged: another dtype, int8, top-k,
            PowerSGD (see `jaxdist.comm`). Default: an exact fp32 `lax.pmean`.
        microbatches: split each replica's batch into this many parts and accumulate their
            gradients before the one reduction (gradient accumulation).
        outer_optimizer: for "local_sgd", DiLoCo's outer optimizer applied every `local_steps`
            to the replicas' averaged movement (e.g. SGD 0.7 with Nesterov momentum 0.9).
        sync_batch_stats: BatchNorm's statistics over the global batch under "shard_map" and
            "pmap" (a `lax.pmean` inside each BatchNorm), as "jit" and one device compute them.
            False keeps each device's own shard statistics (cheaper, and what many multi-GPU
            recipes do; "jit" cannot). Local SGD replicas always use their own: they train
            independently between averaging points.

    Whatever the strategy, dropout and other RNG draws differ between replicas (each folds its
    index into the model's keys), so no replica repeats another's mask.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: LossFn,
        *,
        strategy: str = "jit",
        devices: int | Sequence[jax.Device] | None = None,
        eval_fn: EvalFn | None = None,
        local_steps: int = 1,
        average_opt_state: bool = False,
        skip_nonfinite: bool = True,
        grad_reducer: GradReducer | None = None,
        microbatches: int = 1,
        outer_optimizer: optax.GradientTransformation | None = None,
        sync_batch_stats: bool = True,
    ):
        if not sync_batch_stats and strategy == "jit":
            raise UsageError("strategy jit computes batch statistics over the global batch; "
                             "per-device statistics (sync_batch_stats=False) need shard_map or "
                             "pmap")
        if devices is None or isinstance(devices, int):
            devices = select_devices(devices)
        if grad_reducer is not None and strategy != "shard_map":
            raise UsageError(f"a gradient reducer runs inside the shard_map step; strategy "
                             f"{strategy!r} reduces gradients its own way")
        if microbatches < 1:
            raise UsageError(f"microbatches must be at least 1, got {microbatches}")
        self.devices = list(devices)
        self.mesh = data_mesh(self.devices)
        self.model = model
        comm_init = None
        if grad_reducer is not None:  # one state per replica, stacked
            n = len(self.devices)
            comm_init = lambda p: jax.tree.map(  # noqa: E731
                lambda x: np.broadcast_to(x, (n, *x.shape)), grad_reducer.init(p))
        elif outer_optimizer is not None:
            comm_init = diloco_init(outer_optimizer)
        self.graphdef, initial_state = init_state(model, tx, comm_init)
        # kept on the host: placing it always copies, so donating a placed state never frees it
        self._initial_state = jax.device_get(initial_state)
        replica_graphdef = self.graphdef
        if sync_batch_stats and strategy in ("shard_map", "pmap"):
            replica_graphdef = with_batch_stats_over(self.graphdef, initial_state, DATA_AXIS)

        def train_step_with(reduce, replica_axis):
            return make_train_step(
                self.graphdef if replica_axis is None else replica_graphdef, loss_fn, tx, reduce,
                skip_nonfinite=skip_nonfinite,
                grad_reduce=grad_reducer.update if grad_reducer is not None else None,
                microbatches=microbatches, replica_axis=replica_axis)

        self.backend: Backend = make_backend(
            strategy,
            self.mesh,
            train_step_with,
            local_steps=local_steps,
            average_opt_state=average_opt_state,
            outer_optimizer=outer_optimizer,
        )
        self._eval_step = None
        if eval_fn is not None:
            rep = replicated(self.mesh)
            self._eval_step = jax.jit(
                make_eval_step(self.graphdef, eval_fn),
                in_shardings=(rep, rep, batch_sharded(self.mesh)),
                out_shardings=rep,
            )

    @property
    def strategy(self) -> str:
        return self.backend.name

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return sum(d.process_index == jax.process_index() for d in self.devices)

    def init(self) -> Any:
        """The initial state, laid out on the devices for this strategy."""
        return self.backend.place(self._initial_state)

    def place(self, state: TrainState) -> Any:
        """A canonical `TrainState` (e.g. restored from a checkpoint) in this strategy's layout."""
        return self.backend.place(state)

    def canonical(self, state: Any) -> TrainState:
        """One replicated copy of the state, whatever the strategy (local SGD: the replica mean)."""
        return self.backend.canonical(state)

    def shard_batch(self, local_batch: Any, *, stacked: bool | None = None) -> Any:
        """This process's rows of the global batch -> global arrays split over the data axis.

        `stacked` (default: what the strategy's step expects) adds pmap's leading device axis.
        """
        stacked = self.backend.stacked_batch if stacked is None else stacked
        n_local = self.num_local_devices
        return put_global_batch(
            local_batch, batch_sharded(self.mesh), n_local,
            f"over {n_local} local devices; choose a global batch divisible by "
            f"{self.num_devices}", stacked_over=n_local if stacked else 0)

    def global_batch_size(self, sharded_batch: Any) -> int:
        """Examples in a batch returned by `shard_batch`."""
        shape = jax.tree.leaves(sharded_batch)[0].shape
        return shape[0] * shape[1] if self.backend.stacked_batch else shape[0]

    def step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        """One optimizer step on a global batch. `batch` may be host-local numpy or already sharded.

        The input state is donated: use the returned one.
        """
        if not _is_sharded(batch):
            batch = self.shard_batch(batch)
        return self.backend.step(state, batch)

    def evaluate(self, state: Any, batches: Iterable[Any]) -> dict[str, float]:
        """Sums `eval_fn` over `batches` on all devices; returns the sums as floats."""
        if self._eval_step is None:
            raise UsageError("evaluate needs DataParallel(..., eval_fn=...)")
        canonical = self.canonical(state)
        totals: dict[str, Any] = {}
        for batch in batches:
            sharded = self.shard_batch(batch, stacked=False)
            sums = self._eval_step(canonical.params, canonical.rest, sharded)
            totals = sums if not totals else jax.tree.map(lambda a, b: a + b, totals, sums)
        return {k: float(to_host(v)) for k, v in totals.items()}

    def sync_model(self, state: Any) -> nnx.Module:
        """Writes the state's weights into the user's model (the replica mean for local SGD)."""
        canonical = self.canonical(state)
        nnx.update(self.model, canonical.params, canonical.rest)
        return self.model


def _is_sharded(batch: Any) -> bool:
    leaves = jax.tree.leaves(batch)
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)
