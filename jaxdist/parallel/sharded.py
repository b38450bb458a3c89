"""`ShardedTrainer`: one jitted step whose state is laid out by sharding rules (DP, ZeRO-1, FSDP,
TP, FSDP + TP), created already sharded.

The state is the same `TrainState` as `DataParallel`'s, so one orbax checkpoint restores under
either, on any mesh: the checkpointer lays arrays out like the `like` tree it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.errors import UsageError
from jaxdist.parallel.backends import to_host
from jaxdist.parallel.mesh import put_global_batch
from jaxdist.parallel.rules import (
    Rules,
    as_axis_tuple,
    batch_sharding,
    batch_ways,
    param_shardings,
    replicated_fraction,
    rules_for,
    validate_rules,
    warn_if_mostly_replicated,
)
from jaxdist.train.step import (
    EvalFn,
    LossFn,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    split_model,
)


class ShardedTrainer:
    """Trains a model whose parameters, gradients and optimizer state follow sharding rules.

    Example:
        >>> mesh = make_mesh("data=2,fsdp=2,tensor=2")
        >>> trainer = ShardedTrainer(lambda: ViT(cfg, rngs=nnx.Rngs(0)), optax.adam(1e-3),
        ...                          loss_fn, mesh=mesh, strategy="fsdp_tp")
        >>> state = trainer.init()                 # born sharded: never whole on one device
        >>> state, metrics = trainer.step(state, batch)

    Args:
        model_fn: builds the model; called abstractly for shapes and inside the jitted init.
        tx: an optax optimizer.
        loss_fn: `loss_fn(model, batch) -> loss | (loss, metrics)`, a mean over the batch.
        mesh: a mesh from `jaxdist.parallel.mesh.make_mesh`.
        strategy: a name from `STRATEGY_RULES` or your own `Rules`.
        eval_fn: `eval_fn(model, batch) -> metrics summed over the batch` for `evaluate`.
        skip_nonfinite: skip updates whose loss or gradients are not finite.
    """

    def __init__(self, model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                 loss_fn: LossFn, *, mesh: Mesh, strategy: str | Rules = "fsdp",
                 eval_fn: EvalFn | None = None, skip_nonfinite: bool = True):
        self.mesh = mesh
        self.rules = rules_for(strategy)
        self.strategy = strategy if isinstance(strategy, str) else "custom"
        validate_rules(self.rules)
        self._model_fn, self._tx = model_fn, tx
        abstract_model = nnx.eval_shape(model_fn)
        self.graphdef, abstract_params, abstract_rest = split_model(abstract_model)
        logical = nnx.get_partition_spec(abstract_params)
        rules = self.rules
        self.param_shardings = param_shardings(abstract_params, logical, rules.params, mesh,
                                               rules.unannotated, rules.min_split_size)
        self.grad_shardings = opt_param_shardings = param_shardings(
            abstract_params, logical, rules.for_optimizer(), mesh,
            rules.unannotated_for_optimizer(), rules.min_split_size)
        self._warn_if_mostly_replicated(abstract_params, opt_param_shardings)
        replicated = NamedSharding(mesh, P())
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = optax.tree_utils.tree_map_params(
            tx, lambda _, sharding: sharding, abstract_opt, opt_param_shardings,
            transform_non_params=lambda _: replicated)
        self.state_shardings = TrainState(
            step=replicated, params=self.param_shardings,
            rest=jax.tree.map(lambda _: replicated, abstract_rest), opt_state=opt_shardings)
        self.batch_sharding = batch_sharding(mesh, self.rules)
        self._batch_ways = batch_ways(mesh, self.rules)

        def constrain_grads(tree):  # gradients take the optimizer state's layout
            grads, rest, metrics = tree
            return jax.lax.with_sharding_constraint(grads, opt_param_shardings), rest, metrics

        train_step = make_train_step(self.graphdef, loss_fn, tx, constrain_grads,
                                     skip_nonfinite=skip_nonfinite)
        self._step = jax.jit(train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._eval_step = None
        if eval_fn is not None:
            self._eval_step = jax.jit(
                make_eval_step(self.graphdef, eval_fn),
                in_shardings=(self.param_shardings, self.state_shardings.rest,
                              self.batch_sharding),
                out_shardings=replicated)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _warn_if_mostly_replicated(self, abstract_params, opt_param_shardings) -> None:
        """Strategies meant to split parameters (or, ZeRO-1, optimizer state) over mesh axes of
        more than one device, that would leave most of those bytes replicated, say so."""
        def splits(table, unannotated):
            axes = [a for v in table.values() for a in as_axis_tuple(v)] + list(as_axis_tuple(unannotated))
            return any(self.mesh.shape[a] > 1 for a in axes)

        rules = self.rules
        if splits(rules.params, rules.unannotated):
            warn_if_mostly_replicated("parameter", self.strategy, replicated_fraction(
                abstract_params, self.param_shardings))
        elif splits(rules.for_optimizer(), rules.unannotated_for_optimizer()):
            warn_if_mostly_replicated("optimizer-state", self.strategy, replicated_fraction(
                abstract_params, opt_param_shardings))

    def _build_state(self) -> TrainState:
        return init_state(self._model_fn(), self._tx)[1]

    def init(self) -> TrainState:
        """The initial state, created directly in its sharded layout."""
        return jax.jit(self._build_state, out_shardings=self.state_shardings)()

    def place(self, state: TrainState) -> TrainState:
        """Any `TrainState` of this model (e.g. restored on another layout) in this layout."""
        return jax.device_put(state, self.state_shardings)

    def canonical(self, state: TrainState) -> TrainState:
        """The state itself: sharded arrays are already one logical copy (for checkpoints)."""
        return state

    def shard_batch(self, local_batch: Any, **_) -> Any:
        """This process's rows of the global batch -> global arrays split over the batch axes."""
        n_local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        ways_local = max(1, self._batch_ways * n_local // self.mesh.size)
        return put_global_batch(
            local_batch, self.batch_sharding, ways_local,
            f"into {self._batch_ways} pieces over mesh axes {self.rules.batch}; choose a global "
            f"batch divisible by {self._batch_ways}")

    def global_batch_size(self, sharded_batch: Any) -> int:
        return jax.tree.leaves(sharded_batch)[0].shape[0]

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One optimizer step; the input state is donated: use the returned one."""
        leaves = jax.tree.leaves(batch)
        if not all(isinstance(x, jax.Array) for x in leaves):
            batch = self.shard_batch(batch)
        return self._step(state, batch)

    def lower(self, state: Any, batch: Any) -> jax.stages.Lowered:
        """The step lowered for `state` / `batch` (arrays or ShapeDtypeStructs): `.compile()`
        gives `memory_analysis()`, `cost_analysis()` and the partitioned HLO (`as_text()`)."""
        return self._step.lower(state, batch)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, without allocating it."""
        shapes = jax.eval_shape(self._build_state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, self.state_shardings)

    def evaluate(self, state: TrainState, batches: Iterable[Any]) -> dict[str, float]:
        """Sums `eval_fn` over `batches`; returns the sums as floats."""
        if self._eval_step is None:
            raise UsageError("evaluate needs ShardedTrainer(..., eval_fn=...)")
        totals: dict[str, Any] = {}
        for batch in batches:
            sums = self._eval_step(state.params, state.rest, self.shard_batch(batch))
            totals = sums if not totals else jax.tree.map(lambda a, b: a + b, totals, sums)
        return {k: float(to_host(v)) for k, v in totals.items()}
