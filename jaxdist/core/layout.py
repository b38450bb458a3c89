"""Where a model's activations and repeated layers go, without the model ever seeing a mesh.

A model names the dimensions of its activations (`constrain(x, ("batch", "seq", "embed"))`) and
runs its stack of identical layers through `run_layers` / `layers_then_loss`. Outside a trainer
these are plain code: no constraint, a `lax.scan` over the layers. While a trainer traces its
step it makes a `Layout` current, and the same calls become sharding constraints from the
strategy's activation rules (sequence parallelism is such a rule: `seq` over `tensor`) and a
pipeline over the mesh's `pipeline` axis (GPipe, 1F1B or interleaved), all from the one model
definition.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LayerFn = Callable[..., jax.Array]  # (one layer's parameters, h[, context]) -> h
HeadLossFn = Callable[[Any, jax.Array, Any], jax.Array]  # (head params, h, targets) -> mean loss


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a trainer's strategy decides about activations and layer stacks.

    Attributes:
        mesh: the trainer's mesh.
        activations: logical activation name -> mesh axes (a name or a tuple of names).
        run_layers: `(layer_fn, stacked, h, *, context=None) -> h` over all layers (None: a
            scan).
        layers_then_loss: `(layer_fn, head_loss_fn, stacked, head_params, h, targets, *,
            context=None) -> loss` when the schedule must own the loss too (1F1B); None:
            `run_layers`, then the head.
        context_attention: how attention meets a sequence split over the mesh's `context` axis:
            "ring" or "allgather" (`jaxdist.models.attention`).
    """

    mesh: Mesh
    activations: Mapping[str, Any]
    run_layers: Callable | None = None
    layers_then_loss: Callable | None = None
    context_attention: str = "ring"


_CURRENT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jaxdist_layout",
                                                                       default=None)


@contextlib.contextmanager
def active_layout(layout: Layout | None) -> Iterator[None]:
    """Makes `layout` current while a step is traced."""
    token = _CURRENT.set(layout)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_layout() -> Layout | None:
    return _CURRENT.get()


def _axes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def activation_spec(shape: Sequence[int], names: Sequence[str | None],
                    table: Mapping[str, Any], mesh_shape: Mapping[str, int],
                    manual: Sequence[str] = ()) -> P:
    """Logical activation names -> a PartitionSpec: each mesh axis used once, axes of size 1,
    manual axes and splits that do not divide the dimension left out."""
    used: set[str] = set(manual)
    spec = []
    for dim, name in zip(shape, names):
        axes = [a for a in _axes(table.get(name)) if name is not None
                and mesh_shape.get(a, 1) > 1 and a not in used]
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` laid out by the current strategy's activation rules (unchanged outside a trainer)."""
    layout = current_layout()
    if layout is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = layout.mesh
    manual = tuple(getattr(mesh, "manual_axes", ()))
    spec = activation_spec(x.shape, names, layout.activations, dict(mesh.shape), manual)
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def scan_layers(layer_fn: LayerFn, stacked: Any, h: jax.Array, context: Any = None,
                unroll: bool = False) -> jax.Array:
    """The layers one after the other: `stacked`'s leaves have a leading axis of layers. A
    `context` (a pytree of per-row inputs that are not differentiated, e.g. the segment ids of
    packed documents) reaches every layer unchanged: `layer_fn(params, h, context)`.

    `unroll` compiles every layer on its own instead of one loop body: the saved activations
    are then separate buffers rather than slices of one stacked buffer that the loop first
    zero-fills and then writes layer by layer, which a small model on a CPU pays for (the
    Llama-small step 10-15% slower); the compile time grows with the depth."""
    if context is None:
        body = lambda carry, params: (layer_fn(params, carry), None)  # noqa: E731
    else:
        body = lambda carry, params: (layer_fn(params, carry, context), None)  # noqa: E731
    return lax.scan(body, h, stacked, unroll=bool(unroll))[0]


def run_layers(layer_fn: LayerFn, stacked: Any, h: jax.Array, *, context: Any = None,
               unroll: bool = False) -> jax.Array:
    """All layers of a stack, as the current strategy runs them (pipelined or scanned; `unroll`,
    see `scan_layers`, only where it is not pipelined). Every leaf of `context` has the batch as
    leading dimension; each layer sees the rows of `h` it gets (a pipeline splits the context
    into microbatches with `h`)."""
    layout = current_layout()
    if layout is not None and layout.run_layers is not None:
        return layout.run_layers(layer_fn, stacked, h, context=context)
    return scan_layers(layer_fn, stacked, h, context, unroll)


def layers_then_loss(layer_fn: LayerFn, head_loss_fn: HeadLossFn, stacked: Any,
                     head_params: Any, h: jax.Array, targets: Any, *, context: Any = None,
                     unroll: bool = False) -> jax.Array:
    """`head_loss_fn(head_params, run_layers(...), targets)`: the mean loss of a layer stack and
    its head, which a 1F1B pipeline computes microbatch by microbatch, interleaving backward.
    The head does not see `context`: what it needs per row (a loss mask) goes into `targets`."""
    layout = current_layout()
    if layout is not None and layout.layers_then_loss is not None:
        return layout.layers_then_loss(layer_fn, head_loss_fn, stacked, head_params, h, targets,
                                       context=context)
    return head_loss_fn(head_params, run_layers(layer_fn, stacked, h, context=context,
                                                unroll=unroll), targets)
