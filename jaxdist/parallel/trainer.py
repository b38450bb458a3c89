"""`Trainer`: a user's model, optax optimizer and loss become one jitted step under any strategy.

    trainer = jaxdist.Trainer(MyModel(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn,
                              strategy="fsdp")          # mesh: all devices on the fsdp axis
    state = trainer.init()                            # laid out for the strategy
    state, metrics = trainer.step(state, batch)       # numpy: this process's rows

Every strategy of `jaxdist.parallel.strategies` goes through this one class: the strategy value
picks the mesh and builds the step's layout (`sharded.rules_layout` or `backends.mapped_layout`),
the trainer only serves it. The state is always the same `TrainState`, so checkpoints move
between strategies and device counts.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxdist.cluster.devices import select_devices
from jaxdist.core.step import EvalFn, LossFn, TrainState, split_model
from jaxdist.errors import UsageError
from jaxdist.parallel.backends import to_host
from jaxdist.parallel.mesh import batch_sharded, put_global_batch
from jaxdist.parallel.strategies import Strategy, resolve

ModelOrBuilder = nnx.Module | Callable[[], nnx.Module]


class Trainer:
    """Training of one model under one strategy, on a mesh of devices.

    Args:
        model: a Flax NNX module (its current weights are the start), or a function that builds
            one (called abstractly for shapes; under the rules layout the state is then created
            directly in its sharded layout, never whole on one device).
        tx: an optax optimizer.
        loss_fn: `loss_fn(model, batch) -> loss` or `(loss, metrics)`, a mean over the batch.
        strategy: a name of `jaxdist.parallel.strategies.STRATEGIES` ("jit", "fsdp", ...) or a
            value with its own options: `ShardMap(reducer=int8_reduce())`,
            `LocalSGD(every=8)`, `Rules(...)`, `Pipeline(rules="fsdp", schedule="1f1b")`, ...
        mesh: "data=2,fsdp=4", a `Mesh`, or None: all `devices` on the strategy's own axis
            (`strategy.default_mesh`).
        devices: a device count, a list of devices, or None for all (ignored with a `Mesh`).
        eval_fn: `eval_fn(model, batch) -> metrics summed over the batch` for `evaluate`.
        microbatches: split each step's batch into this many parts and accumulate their
            gradients before the one reduction (gradient accumulation), under every strategy.
        skip_nonfinite: skip updates whose loss or gradients are not finite; the step reports
            `metrics["nonfinite"]`.
        init_params: where `init` (and so `fit`) takes the starting weights from instead of the
            model: a function of the parameters' shapes, dtypes and shardings (a tree of
            `jax.ShapeDtypeStruct`) returning them laid out so, e.g. a checkpoint read straight
            into its shards (`jaxdist.io.hf.hf_init_params(path)`). The optimizer state is made
            from them.

    Attributes:
        strategy: the strategy's name (`strategy.name`: "fsdp", "local_sgd", "custom" for your
            own `Rules`).

    Whatever the strategy, dropout and other RNG draws differ between replicas, never one mask
    repeated on every replica.
    """

    def __init__(
        self,
        model: ModelOrBuilder,
        tx: optax.GradientTransformation,
        loss_fn: LossFn,
        *,
        strategy: str | Strategy = "jit",
        mesh: str | Mesh | None = None,
        devices: int | Sequence[jax.Device] | None = None,
        eval_fn: EvalFn | None = None,
        microbatches: int = 1,
        skip_nonfinite: bool = True,
        init_params: Callable[[Any], Any] | None = None,
    ):
        value = resolve(strategy)
        self.strategy = value.name
        if microbatches < 1:
            raise UsageError(f"microbatches must be at least 1, got {microbatches}")
        if not isinstance(model, nnx.Module) and not callable(model):
            raise UsageError(f"model must be an nnx.Module or a function that builds one, got "
                             f"{type(model).__name__}")
        if isinstance(mesh, Mesh):
            devices = list(mesh.devices.flat)
        elif devices is None or isinstance(devices, int):
            devices = select_devices(devices)
        self.mesh = value.mesh_for(mesh, list(devices))
        self.devices = list(self.mesh.devices.flat)
        self.model = model if isinstance(model, nnx.Module) else None
        self._builder = None if self.model is not None else model
        self._tx, self._init_params = tx, init_params
        layout = value.build(model, tx, loss_fn, self.mesh, eval_fn,
                             dict(skip_nonfinite=skip_nonfinite, microbatches=microbatches))
        self.graphdef, self.backend = layout.graphdef, layout.backend
        self.rules = layout.rules
        self.param_shardings, self.grad_shardings = layout.param_shardings, layout.grad_shardings
        self.state_shardings, self.batch_sharding = layout.state_shardings, layout.batch_sharding
        self._batch_ways = layout.batch_ways
        self._initial_state, self._abstract_state = layout.initial_state, layout.abstract_state
        self._eval_step = layout.eval_step

    # -- the public surface, the same for every strategy
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_local_devices(self) -> int:
        return sum(d.process_index == jax.process_index() for d in self.devices)

    def init(self) -> Any:
        """The initial state, laid out on the devices for this strategy."""
        if self._init_params is None:
            return self._initial_state()
        return self._start_from_init_params()

    def _start_from_init_params(self) -> Any:
        """The initial state with `init_params`' weights and an optimizer state made from them.
        Under the rules layout the model's own weights are never made, only its other state
        (the mapped layouts hold them on the host already)."""
        if self.state_shardings is None:
            start = self.canonical(self._initial_state())
            if jax.tree.leaves(start.comm):
                raise UsageError(f"init_params: strategy {self.strategy} keeps gradient-reducer "
                                 f"state made from the model's weights; give it a model holding "
                                 f"them")
        else:
            start = TrainState(jnp.zeros((), jnp.int32), self.abstract_state().params,
                               self._model_rest(), None)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            start.params)
        params = self._init_params(like)
        if jax.tree.structure(params) != jax.tree.structure(like):
            raise UsageError("init_params returned another tree than the model's parameters")
        return self.place(start._replace(params=params, opt_state=jax.jit(self._tx.init)(params)))

    def _model_rest(self) -> Any:
        """The model's state that is not parameters (RNG counters, batch statistics); from a
        builder, made under jit, where the weights it also draws are compiled away."""
        if self.model is not None:
            return split_model(self.model)[2]
        return jax.jit(lambda: split_model(self._builder())[2])()

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
