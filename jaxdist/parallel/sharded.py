"""The rules layout: one jitted step whose state is laid out by sharding rules (`jit`/`dp`,
ZeRO-1, FSDP, TP, FSDP + TP, your own `Rules`), created already sharded.

The state is the same `TrainState` as the mapped layouts', so one orbax checkpoint restores under
any strategy, on any mesh: the checkpointer lays arrays out like the `like` tree it is given.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.layout import Layout, active_layout
from jaxdist.core.step import (
    EvalFn,
    LossFn,
    TrainState,
    init_state,
    make_eval_step,
    make_train_step,
    split_model,
)
from jaxdist.parallel.backends import Backend, StepLayout
from jaxdist.parallel.mesh import put_host_tree
from jaxdist.parallel.pipeline import PIPELINE_AXIS, stack_runners
from jaxdist.parallel.rules import (
    Rules,
    as_axis_tuple,
    batch_sharding,
    batch_ways,
    param_shardings,
    replicated_fraction,
    warn_if_mostly_replicated,
)


def rules_layout(model: nnx.Module | Callable[[], nnx.Module], tx: optax.GradientTransformation,
                 loss_fn: LossFn, mesh: Mesh, rules: Rules, name: str,
                 eval_fn: EvalFn | None, step_options: dict, *,
                 pipeline_microbatches: int | None = None,
                 pipeline_schedule: str = "gpipe",
                 pipeline_virtual_stages: int = 2) -> StepLayout:
    """The step, shardings and initial state of `model` (or a builder of it) under `rules`, the
    strategy called `name`; on a mesh with pipeline > 1 the layer stack is pipelined with
    `pipeline_microbatches` (None: 2 S) scheduled by `pipeline_schedule` (interleaved: with
    `pipeline_virtual_stages` chunks per device)."""
    train_layout, eval_layout = layouts(mesh, rules, pipeline_microbatches, pipeline_schedule,
                                        pipeline_virtual_stages)
    if isinstance(model, nnx.Module):
        graphdef, params, rest = split_model(model)
        abstract_params, abstract_rest = jax.eval_shape(lambda: (params, rest))
        build_state = lambda: init_state(model, tx)[1]  # noqa: E731 - from the user's values
        born_sharded = False
    else:
        graphdef, abstract_params, abstract_rest = split_model(nnx.eval_shape(model))
        build_state = lambda: init_state(model(), tx)[1]  # noqa: E731
        born_sharded = True
    logical = nnx.get_partition_spec(abstract_params)
    params_sh = param_shardings(abstract_params, logical, rules.params, mesh, rules.unannotated,
                                rules.min_split_size)
    grads_sh = param_shardings(abstract_params, logical, rules.for_optimizer(), mesh,
                               rules.unannotated_for_optimizer(), rules.min_split_size)
    _warn_if_mostly_replicated(rules, name, mesh, abstract_params, params_sh, grads_sh)
    rep = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_opt, grads_sh,
        transform_non_params=lambda _: rep)
    state_sh = TrainState(step=rep, params=params_sh,
                          rest=jax.tree.map(lambda _: rep, abstract_rest), opt_state=opt_sh)
    batch_sh = batch_sharding(mesh, rules)

    def constrain_grads(tree):  # gradients take the optimizer state's layout
        grads, rest, metrics = tree
        return jax.lax.with_sharding_constraint(grads, grads_sh), rest, metrics

    train_step = in_layout(make_train_step(graphdef, loss_fn, tx, constrain_grads,
                                           **step_options), train_layout)
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=0)
    eval_step = None
    if eval_fn is not None:
        eval_step = jax.jit(in_layout(make_eval_step(graphdef, eval_fn), eval_layout),
                            in_shardings=(params_sh, state_sh.rest, batch_sh), out_shardings=rep)

    def initial_state() -> TrainState:
        if born_sharded:  # created directly in its layout: never whole on one device
            return jax.jit(build_state, out_shardings=state_sh)()
        return put_host_tree(jax.device_get(build_state()), state_sh)

    def abstract_state() -> TrainState:
        shapes = jax.eval_shape(build_state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, state_sh)

    backend = Backend(name, mesh, lambda state: jax.device_put(state, state_sh), step,
                      lambda state: state)
    return StepLayout(graphdef, backend, batch_sh, batch_ways(mesh, rules), initial_state,
                      abstract_state, eval_step, rules=rules, param_shardings=params_sh,
                      grad_shardings=grads_sh, state_shardings=state_sh)


def layouts(mesh: Mesh, rules: Rules, microbatches: int | None, schedule: str,
            virtual_stages: int = 2) -> tuple[Layout, Layout]:
    """What the train and eval steps trace under: the rules' activation layout and, on a mesh
    with pipeline > 1, the pipeline (evaluation runs GPipe's forward: there is no backward to
    interleave)."""
    stages = mesh.shape[PIPELINE_AXIS]
    activations = rules.for_activations()
    attention = rules.context_attention
    if stages == 1:
        plain = Layout(mesh, activations, context_attention=attention)
        return plain, plain
    microbatches = 2 * stages if microbatches is None else microbatches
    batch_axes = tuple(a for a in rules.batch if a != PIPELINE_AXIS)
    run, then_loss = stack_runners(mesh, microbatches=microbatches, schedule=schedule,
                                   batch_axes=batch_axes, virtual_stages=virtual_stages)
    return (Layout(mesh, activations, run, then_loss, attention),
            Layout(mesh, activations, run, context_attention=attention))


def in_layout(fn: Callable, layout: Layout) -> Callable:
    """`fn`, traced with `layout` current."""
    @functools.wraps(fn)
    def traced(*args):
        with active_layout(layout):
            return fn(*args)

    return traced


def _warn_if_mostly_replicated(rules, name, mesh, abstract_params, params_sh, grads_sh) -> None:
    """Strategies meant to split parameters (or, ZeRO-1, optimizer state) over mesh axes of more
    than one device, that would leave most of those bytes replicated, say so."""
    def splits(table, unannotated):
        axes = [a for v in table.values() for a in as_axis_tuple(v)]
        return any(mesh.shape[a] > 1 for a in axes + list(as_axis_tuple(unannotated)))

    if splits(rules.params, rules.unannotated):
        warn_if_mostly_replicated("parameter", name, replicated_fraction(abstract_params,
                                                                         params_sh))
    elif splits(rules.for_optimizer(), rules.unannotated_for_optimizer()):
        warn_if_mostly_replicated("optimizer-state", name, replicated_fraction(abstract_params,
                                                                               grads_sh))
