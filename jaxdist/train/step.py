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

Batch = Any
Metrics = dict[str, jax.Array]
# loss_fn(model, batch) -> loss, or (loss, metrics): the mean over the examples it is given.
LossFn = Callable[[nnx.Module, Batch], "jax.Array | tuple[jax.Array, Metrics]"]
# eval_fn(model, batch) -> metrics summed over the batch's examples (padding masked out).
EvalFn = Callable[[nnx.Module, Batch], Metrics]
Reduce = Callable[[Any], Any]


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree.

    `rest` holds the model's non-parameter state (batch statistics, RNG counters); it is empty for
    the CNN.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable parameters, everything else)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """The model's structure and its initial train state (on the host or default device)."""
    graphdef, params, rest = split_model(model)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))
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
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `(state, batch) -> (state, metrics)`.

    `reduce` averages a pytree over data-parallel replicas (identity when the program is already
    global). It is applied to gradients, metrics and the non-parameter model state.
    """

    def loss_with_rest(params, rest, batch):
        # copy: `rest` comes from outside the grad trace, and layers such as BatchNorm mutate it
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss, metrics = _as_loss_and_metrics(loss_fn(model, batch))
        _, _, new_rest = split_model(model)
        return loss, (metrics, new_rest)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grad_fn = jax.value_and_grad(loss_with_rest, has_aux=True)
        (loss, (metrics, rest)), grads = grad_fn(state.params, state.rest, batch)
        grads, rest, metrics = reduce((grads, rest, {"loss": loss, **metrics}))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, rest, opt_state), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, eval_fn: EvalFn
) -> Callable[[nnx.State, nnx.State, Batch], Metrics]:
    """A pure `(params, rest, batch) -> summed metrics`; it never changes the state."""

    def eval_step(params, rest, batch):
        return eval_fn(nnx.merge(graphdef, params, rest), batch)

    return eval_step
