"""`Trainer`: a user's model, optax optimizer and loss become one jitted step under any strategy.

    trainer = jaxdist.Trainer(MyModel(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn,
                              strategy="fsdp")          # mesh: all devices on the fsdp axis
    state = trainer.init()                            # laid out for the strategy
    state, metrics = trainer.step(state, batch)       # numpy: this process's rows

Every strategy of `jaxdist.parallel.strategies` goes through this one class; what differs is the
layout that builds its step (`sharded.rules_layout` or `backends.make_backend`). The state is
always the same `TrainState`, so checkpoints move between strategies and device counts.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxdist.cluster.devices import select_devices
from jaxdist.comm.reducers import GradReducer
from jaxdist.core.axes import DATA_AXIS
from jaxdist.core.step import (
    EvalFn,
    LossFn,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    with_batch_stats_over,
)
from jaxdist.errors import UsageError
from jaxdist.parallel.backends import Backend, diloco_init, make_backend, to_host
from jaxdist.parallel.mesh import (
    batch_sharded,
    data_mesh,
    make_mesh,
    parse_mesh_shape,
    put_global_batch,
    replicated,
)
from jaxdist.parallel.rules import Rules, rules_for
from jaxdist.parallel.sharded import rules_layout
from jaxdist.parallel.strategies import STRATEGIES_TABLE, STRATEGY_NAMES, Strategy, default_mesh

ModelOrBuilder = nnx.Module | Callable[[], nnx.Module]


class Trainer:
    """Training of one model under one strategy, on a mesh of devices.

    Args:
        model: a Flax NNX module (its current weights are the start), or a function that builds
            one (called abstractly for shapes; under the rules layout the state is then created
            directly in its sharded layout, never whole on one device).
        tx: an optax optimizer.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, metrics)`, a mean over the batch.
        strategy: a name from `jaxdist.parallel.strategies.STRATEGIES_TABLE`, or your own `Rules`.
        mesh: "data=2,fsdp=4", a `Mesh`, or None: all `devices` on the strategy's own axis.
        devices: a device count, a list of devices, or None for all (ignored with a `Mesh`).
        eval_fn: `eval_fn(model, batch) -> metrics summed over the batch` for `evaluate`.
        microbatches: split each step's batch into this many parts and accumulate their
            gradients before the one reduction (gradient accumulation), under every strategy.
        grad_reducer: shard_map only: how gradients are averaged (bf16, int8, top-k, PowerSGD;
            see `jaxdist.comm`). Default: an exact fp32 mean.
        local_steps, average_opt_state, outer_optimizer: local_sgd only: average parameters every
            H steps, also the optimizer state, DiLoCo's outer optimizer.
        sync_batch_stats: BatchNorm statistics over the global batch (default, as one device
            computes them). False: each device's own shard (shard_map and pmap only).
        skip_nonfinite: skip updates whose loss or gradients are not finite; the step reports
            `metrics["nonfinite"]`.
        pipeline_microbatches, pipeline_schedule: on a mesh with pipeline=S > 1, a model that
            runs its layer stack through `jaxdist.core.layout` is pipelined over S stages with
            this many microbatches (default 2 S), scheduled "gpipe" or "1f1b".

    Whatever the strategy, dropout and other RNG draws differ between replicas, never one mask
    repeated on every replica.
    """

    def __init__(
        self,
        model: ModelOrBuilder,
        tx: optax.GradientTransformation,
        loss_fn: LossFn,
        *,
        strategy: str | Rules = "jit",
        mesh: str | Mesh | None = None,
        devices: int | Sequence[jax.Device] | None = None,
        eval_fn: EvalFn | None = None,
        microbatches: int = 1,
        grad_reducer: GradReducer | None = None,
        local_steps: int = 1,
        average_opt_state: bool = False,
        outer_optimizer: optax.GradientTransformation | None = None,
        sync_batch_stats: bool = True,
        skip_nonfinite: bool = True,
        pipeline_microbatches: int | None = None,
        pipeline_schedule: str = "gpipe",
    ):
        row = _strategy_row(strategy)
        self.strategy = row.name
        _check_options(row, microbatches=microbatches, grad_reducer=grad_reducer,
                       local_steps=local_steps, outer_optimizer=outer_optimizer,
                       average_opt_state=average_opt_state, sync_batch_stats=sync_batch_stats)
        self.mesh = _resolve_mesh(row, mesh, devices)
        self.devices = list(self.mesh.devices.flat)
        self.model = model if isinstance(model, nnx.Module) else None
        self._model_fn = None if isinstance(model, nnx.Module) else model
        if self._model_fn is not None and not callable(self._model_fn):
            raise UsageError(f"model must be an nnx.Module or a function that builds one, got "
                             f"{type(model).__name__}")
        self._tx = tx
        step_options = dict(skip_nonfinite=skip_nonfinite, microbatches=microbatches)
        if row.layout == "mapped":
            self._build_mapped(row, loss_fn, eval_fn, step_options, grad_reducer=grad_reducer,
                               local_steps=local_steps, average_opt_state=average_opt_state,
                               outer_optimizer=outer_optimizer, sync=sync_batch_stats)
        else:
            layout = rules_layout(
                model, tx, loss_fn, self.mesh,
                strategy if isinstance(strategy, Rules) else rules_for(
                    "dp" if row.name == "jit" else row.name),
                self.strategy, eval_fn, step_options,
                pipeline_microbatches=pipeline_microbatches, pipeline_schedule=pipeline_schedule)
            self.graphdef = layout.graphdef
            self.rules = layout.rules
            self.param_shardings, self.grad_shardings = layout.param_shardings, layout.grad_shardings
            self.state_shardings, self.batch_sharding = layout.state_shardings, layout.batch_sharding
            self._batch_ways = layout.batch_ways
            self._initial_state, self._abstract_state = layout.initial_state, layout.abstract_state
            self._eval_step = layout.eval_step
            self.backend = Backend(self.strategy, self.mesh, layout.place, layout.step,
                                   lambda s: s)

    # -- construction of the mapped layouts (shard_map, pmap, local SGD)
    def _build_mapped(self, row: Strategy, loss_fn, eval_fn, step_options, *, grad_reducer,
                      local_steps, average_opt_state, outer_optimizer, sync):
        model = self.model if self.model is not None else self._model_fn()
        n = len(self.devices)
        comm_init = None
        if grad_reducer is not None:  # one state per replica, stacked
            comm_init = lambda p: jax.tree.map(  # noqa: E731
                lambda x: np.broadcast_to(x, (n, *x.shape)), grad_reducer.init(p))
        elif outer_optimizer is not None:
            comm_init = diloco_init(outer_optimizer)
        self.graphdef, initial = init_state(model, self._tx, comm_init)
        # kept on the host: placing it always copies, so donating a placed state never frees it
        host_state = jax.device_get(initial)
        self._initial_state = lambda: self.backend.place(host_state)
        self._abstract_state = None
        replica_graphdef = self.graphdef
        if sync and row.per_device_batch_stats:
            replica_graphdef = with_batch_stats_over(self.graphdef, initial, DATA_AXIS)

        def train_step_with(reduce):
            return make_train_step(
                replica_graphdef, loss_fn, self._tx, reduce,
                grad_reduce=grad_reducer.update if grad_reducer is not None else None,
                replica_axis=DATA_AXIS, **step_options)

        self.backend = make_backend(row.name, self.mesh, train_step_with, local_steps=local_steps,
                                    average_opt_state=average_opt_state,
                                    outer_optimizer=outer_optimizer)
        self.rules = None
        self.param_shardings = self.grad_shardings = self.state_shardings = None
        self.batch_sharding = batch_sharded(self.mesh)
        self._batch_ways = n
        self._eval_step = None
        if eval_fn is not None:
            rep = replicated(self.mesh)
            self._eval_step = jax.jit(make_eval_step(self.graphdef, eval_fn),
                                      in_shardings=(rep, rep, batch_sharded(self.mesh)),
                                      out_shardings=rep)

    # -- the public surface, the same for every strategy
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return sum(d.process_index == jax.process_index() for d in self.devices)

    def init(self) -> Any:
        """The initial state, laid out on the devices for this strategy."""
        return self._initial_state()

    def place(self, state: TrainState) -> Any:
        """A canonical `TrainState` (e.g. restored from a checkpoint) in this strategy's layout."""
        return self.backend.place(state)

    def canonical(self, state: Any) -> TrainState:
        """One logical copy of the state, whatever the strategy (local SGD: the replica mean)."""
        return self.backend.canonical(state)

    def replicas(self, state: Any) -> TrainState | None:
        """Each replica's own state, stacked on a leading replica axis, where the replicas differ
        (local SGD between averaging points: parameters, optimizer moments, batch statistics);
        None under every other strategy. Checkpoints keep it beside `canonical`, which averages
        it away, so a run resumes exactly."""
        return state if self.backend.per_replica else None

    def place_replicas(self, replicas: TrainState) -> Any:
        """A state from `replicas` (e.g. restored for as many replicas) in this layout."""
        if not self.backend.per_replica:
            raise UsageError(f"strategy {self.strategy} keeps no per-replica states")
        return jax.device_put(replicas, batch_sharded(self.mesh))

    def shard_batch(self, local_batch: Any, *, stacked: bool | None = None) -> Any:
        """This process's rows of the global batch -> global arrays split over the batch axes.

        `stacked` (default: what the strategy's step expects) adds pmap's leading device axis.
        """
        stacked = self.backend.stacked_batch if stacked is None else stacked
        n_local = self.num_local_devices
        pieces = max(1, self._batch_ways * n_local // self.num_devices)
        return put_global_batch(
            local_batch, self.batch_sharding, pieces,
            f"over {pieces} local devices; choose a global batch divisible by "
            f"{self._batch_ways}", stacked_over=n_local if stacked else 0)

    def global_batch_size(self, sharded_batch: Any) -> int:
        """Examples in a batch returned by `shard_batch`."""
        shape = jax.tree.leaves(sharded_batch)[0].shape
        return shape[0] * shape[1] if self.backend.stacked_batch else shape[0]

    def step(self, state: Any, batch: Any) -> tuple[Any, dict]:
        """One optimizer step on a global batch (host-local numpy or already sharded).

        The input state is donated: use the returned one.
        """
        leaves = jax.tree.leaves(batch)
        if not (leaves and all(isinstance(x, jax.Array) for x in leaves)):
            batch = self.shard_batch(batch)
        return self.backend.step(state, batch)

    def lower(self, state: Any, batch: Any) -> jax.stages.Lowered:
        """The step lowered for `state` / `batch` (arrays or ShapeDtypeStructs): `.compile()`
        gives `memory_analysis()`, `cost_analysis()` and the partitioned HLO (`as_text()`)."""
        return self.backend.step.lower(state, batch)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without allocating it (rules layout)."""
        if self._abstract_state is None:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), self.init())
        return self._abstract_state()

    def evaluate(self, state: Any, batches: Iterable[Any]) -> dict[str, float]:
        """Sums `eval_fn` over `batches` on all devices; returns the sums as floats."""
        if self._eval_step is None:
            raise UsageError("evaluate needs Trainer(..., eval_fn=...)")
        canonical = self.canonical(state)
        totals: dict[str, Any] = {}
        for batch in batches:
            sharded = self.shard_batch(batch, stacked=False)
            sums = self._eval_step(canonical.params, canonical.rest, sharded)
            totals = sums if not totals else jax.tree.map(lambda a, b: a + b, totals, sums)
        return {k: float(to_host(v)) for k, v in totals.items()}

    def sync_model(self, state: Any) -> nnx.Module:
        """The model with the state's weights: the user's own (updated in place), or a new one
        when the trainer was given a builder (the replica mean for local SGD)."""
        canonical = self.canonical(state)
        if self.model is None:
            return nnx.merge(self.graphdef, *jax.device_get((canonical.params, canonical.rest)))
        nnx.update(self.model, canonical.params, canonical.rest)
        return self.model


def _strategy_row(strategy: str | Rules) -> Strategy:
    if isinstance(strategy, Rules):
        return Strategy("custom", "rules", "your own sharding rules")
    if strategy not in STRATEGIES_TABLE:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of "
                         f"{', '.join(STRATEGY_NAMES)} or pass Rules(...)")
    return STRATEGIES_TABLE[strategy]


def _check_options(row: Strategy, *, microbatches, grad_reducer, local_steps, outer_optimizer,
                   average_opt_state, sync_batch_stats) -> None:
    """Options that only some strategies have are clear errors elsewhere."""
    if microbatches < 1:
        raise UsageError(f"microbatches must be at least 1, got {microbatches}")
    if grad_reducer is not None and not row.grad_reducer:
        raise UsageError(f"a gradient reducer runs inside the shard_map step; strategy "
                         f"{row.name!r} reduces gradients its own way")
    if not row.local_steps and (local_steps != 1 or outer_optimizer is not None
                                or average_opt_state):
        raise UsageError(f"local_steps, average_opt_state and outer_optimizer are for strategy "
                         f"local_sgd, not {row.name}")
    if not sync_batch_stats and not row.per_device_batch_stats:
        raise UsageError(f"strategy {row.name} computes batch statistics over the global batch; "
                         f"per-device statistics (sync_batch_stats=False) need shard_map or pmap")


def _resolve_mesh(row: Strategy, mesh: str | Mesh | None,
                  devices: int | Sequence[jax.Device] | None) -> Mesh:
    if isinstance(mesh, Mesh):
        devices = list(mesh.devices.flat)
        if row.layout == "mapped":
            others = {a: s for a, s in mesh.shape.items() if a != DATA_AXIS and s > 1}
            if others:
                raise UsageError(f"strategy {row.name} runs over the data axis only; the mesh "
                                 f"also has {others}")
            return data_mesh(devices)
        return mesh
    if devices is None or isinstance(devices, int):
        devices = select_devices(devices)
    devices = list(devices)
    if row.layout == "mapped":
        if mesh:
            shape = parse_mesh_shape(mesh)
            if any(s > 1 for a, s in shape.items() if a != DATA_AXIS):
                raise UsageError(f"strategy {row.name} runs over the data axis only, not {mesh}")
            if shape.get(DATA_AXIS, 1) != len(devices):
                make_mesh(shape, devices)  # the usual message about the device count
        return data_mesh(devices)
    return make_mesh(mesh or default_mesh(row.name, len(devices)), devices)
