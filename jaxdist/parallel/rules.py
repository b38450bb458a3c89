"""Sharding as data: logical axis names on parameters, one rules table, one translation.

Models name the dimensions of their parameters with the logical names of `LOGICAL_AXES` and never
see a mesh. A strategy is a `Rules` value saying which mesh axes each logical name is split over,
for parameters and for optimizer state, and which mesh axes split the batch:

| strategy  | parameters                       | optimizer state        | batch over      |
|-----------|----------------------------------|------------------------|-----------------|
| `dp`      | replicated                       | replicated             | data, fsdp      |
| `zero1`   | replicated                       | split over data, fsdp  | data, fsdp      |
| `fsdp`    | split over fsdp (ZeRO-3)         | like the parameters    | data, fsdp      |
| `tp`      | mlp, heads over tensor (Megatron)| like the parameters    | data, fsdp      |
| `sp`      | like tp; activations between     | like the parameters    | data, fsdp      |
|           | attention and MLP split on seq   |                        |                 |
| `fsdp_tp` | both                             | like the parameters    | data, fsdp      |
| `ep`      | fsdp; experts over expert        | like the parameters    | data, fsdp,     |
|           |                                  |                        | expert          |

Every strategy splits a stack of layers (logical `layers`) over the `pipeline` axis, so a mesh with
pipeline > 1 pipelines a model that runs its stack through `jaxdist.core.layout.run_layers`, with
the default options of `jaxdist.parallel.strategies.Pipeline` (which sets them:
`Pipeline(rules="fsdp", microbatches=8, schedule="1f1b")`).

Under `fsdp` with data > 1 the parameters are split within each data group and replicated across
groups (hybrid sharding). Gradients take the optimizer state's layout, so XLA reduce-scatters them
wherever the optimizer state is split.

Every strategy also splits the sequence over the `context` axis (context parallelism): a mesh
with context > 1 splits every activation's sequence (logical `seq` and `length`) over it, and
attention passes keys and values between its devices (`Rules.context_attention`: "ring" or
"allgather", see `jaxdist.models.attention`); parameters are laid out as without it, replicated
over context. Under `sp` the residual stream's sequence is split over context, then tensor.

`ep` is expert parallelism: a mixture of experts' weights (logical `expert`, see
`jaxdist.models.moe`) split over the `expert` mesh axis, the rest as under `fsdp`, and the batch
over `expert` too, so the expert groups are data parallel everywhere but in the experts.

Each named rule set is a strategy value of `jaxdist.parallel.strategies.STRATEGIES` (`DP`, `ZERO1`,
`FSDP`, `TP`, `SP`, `FSDP_TP`, `EP` here); your own `Rules(...)` is one too.

A model needs no annotations for FSDP or ZeRO-1: an array without logical names is split on its
largest dimension that divides over the axis (`Rules.unannotated`), as PyTorch FSDP and
big_vision's FSDP rule do, when it has at least `Rules.min_split_size` elements (smaller ones
cost more in collectives than they save). Tensor parallelism does need them: which dimension is a
column or a row split is the model's semantics, not a shape. A strategy that would still leave
most bytes replicated says so (`ReplicationWarning`) instead of training silently as DP.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdist.core.step import path_name
from jaxdist.errors import UsageError
from jaxdist.models.attention import CONTEXT_ATTENTIONS
from jaxdist.parallel.mesh import MESH_AXES, make_mesh

if TYPE_CHECKING:
    from jaxdist.parallel.backends import StepLayout

# activations: "seq" is the residual stream's sequence (split by sp and cp), "length" the sequence
# inside attention and the MLP (split by cp only)
LOGICAL_AXES = ("batch", "embed", "mlp", "heads", "kv_heads", "kv", "vocab", "layers", "patch", "seq",
                "classes", "conv_in", "conv_out", "features", "expert", "length")

MeshAxes = str | tuple[str, ...] | None
BATCH_AXES = ("data", "fsdp")
STORAGE_AXES = frozenset(BATCH_AXES)  # axes that only lay out storage (FSDP, ZeRO)


class ReplicationWarning(UserWarning):
    """A sharding strategy leaves most of the bytes it is meant to split replicated."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """A strategy of the rules layout: logical name -> mesh axes, for parameters and optimizer
    state; mesh axes of the batch.

    `optimizer=None` means "laid out like the parameters". `unannotated` (and
    `unannotated_optimizer`, default like the parameters when `optimizer` is None) are the mesh
    axes that split arrays without logical names, on their largest dividing dimension. `name` is
    what the trainer reports (the registry's name for its own rule sets); it takes no part in
    equality, so rules equal to FSDP's are FSDP.
    `context_attention` is how attention meets a sequence split over the mesh's `context` axis:
    "ring" (key/value blocks passed around) or "allgather".

    Example:
        >>> Trainer(model_fn, tx, loss_fn, strategy=Rules(params={"embed": "fsdp"}),
        ...         mesh="fsdp=8")
    """

    params: Mapping[str, MeshAxes]
    optimizer: Mapping[str, MeshAxes] | None = None
    batch: tuple[str, ...] = BATCH_AXES
    unannotated: MeshAxes = None
    unannotated_optimizer: MeshAxes = None
    min_split_size: int = 128
    activations: Mapping[str, MeshAxes] | None = None
    context_attention: str = "ring"
    name: str = dataclasses.field(default="custom", compare=False)

    layout: ClassVar[Literal["rules"]] = "rules"
    parallelism: ClassVar[Literal["model"]] = "model"

    def __post_init__(self):
        validate_rules(self)

    def default_mesh(self, devices: int) -> str:
        """All devices on the axis the rules split parameters over (expert, else fsdp, else
        data); rules that split over tensor take pairs (tensor=2)."""
        axes = {a for v in self.params.values() for a in as_axis_tuple(v)}
        axes |= set(as_axis_tuple(self.unannotated))
        if "expert" in axes:
            return f"expert={devices}"
        outer = "fsdp" if "fsdp" in axes else "data"
        if "tensor" in axes:
            tensor = 2 if devices % 2 == 0 and devices > 1 else 1
            return f"{outer}={devices // tensor},tensor={tensor}"
        return f"{outer}={devices}"

    def mesh_for(self, mesh: str | Mesh | None, devices: Sequence[jax.Device]) -> Mesh:
        """`mesh` ("data=2,fsdp=4", a `Mesh`, or None: `default_mesh`) over `devices`."""
        if isinstance(mesh, Mesh):
            return mesh
        return make_mesh(mesh or self.default_mesh(len(devices)), devices)

    def build(self, model: Any, tx: Any, loss_fn: Callable, mesh: Mesh, eval_fn: Callable | None,
              step_options: dict) -> StepLayout:
        """The rules layout of the step (`jaxdist.parallel.sharded.rules_layout`); on a mesh with
        pipeline > 1 the layer stack is pipelined with `Pipeline()`'s default options."""
        from jaxdist.parallel.sharded import rules_layout  # it builds on this module

        return rules_layout(model, tx, loss_fn, mesh, self, self.name, eval_fn, step_options)

    def for_activations(self) -> Mapping[str, MeshAxes]:
        """Activation name -> mesh axes: the batch over the batch axes, the sequence over
        context, heads / hidden units / vocabulary / experts where the parameters split them
        (tensor and expert parallelism), plus `activations`."""
        table: dict[str, MeshAxes] = {"batch": self.batch, **_CONTEXT}
        table.update({name: self.params[name] for name in ("heads", "mlp", "vocab", "expert")
                      if name in self.params})
        table.update(self.activations or {})
        return table

    def for_optimizer(self) -> Mapping[str, MeshAxes]:
        return self.params if self.optimizer is None else self.optimizer

    def unannotated_for_optimizer(self) -> MeshAxes:
        return self.unannotated if self.optimizer is None else self.unannotated_optimizer


# FSDP splits one dimension of every parameter it can: the first named one in the parameter's
# spec that appears here (a mesh axis is used once per parameter, so fc1 ("embed", "mlp") is split
# on embed, its bias ("mlp",) on mlp).
# A stack of layers (a leading "layers" axis) is split over "pipeline" under every strategy: with
# pipeline > 1 each stage holds its own layers.
_STACK = {"layers": "pipeline"}
_FSDP = {name: "fsdp" for name in ("embed", "features", "conv_out", "mlp", "heads")}
# Megatron: attention heads and MLP hidden units split (column then row), and the vocabulary
_TP = {"mlp": "tensor", "heads": "tensor", "vocab": "tensor"}
# expert parallelism: a mixture of experts' stacked experts split over the expert axis
_EP = {"expert": "expert"}
# context parallelism, under every strategy: the sequence of every activation split over the
# context axis (attention passes keys and values between its devices, `jaxdist.models.attention`)
_CONTEXT = {"seq": "context", "length": "context"}


def validate_rules(rules: Rules) -> None:
    """Every logical name and mesh axis in `rules` exists."""
    for table in (rules.params, rules.for_optimizer(), rules.for_activations()):
        for name, axes in table.items():
            if name not in LOGICAL_AXES:
                raise UsageError(f"unknown logical axis {name!r} in the sharding rules; "
                                 f"known: {', '.join(LOGICAL_AXES)}")
            for axis in as_axis_tuple(axes):
                if axis not in MESH_AXES:
                    raise UsageError(f"rule {name!r} -> {axis!r}: unknown mesh axis; "
                                     f"choose from {', '.join(MESH_AXES)}")
    for axis in rules.batch:
        if axis not in MESH_AXES:
            raise UsageError(f"unknown mesh axis {axis!r} for the batch")
    if rules.context_attention not in CONTEXT_ATTENTIONS:
        raise UsageError(f"context_attention must be one of {', '.join(CONTEXT_ATTENTIONS)}, "
                         f"got {rules.context_attention!r}")


def as_axis_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


# the named rule sets: the rules strategies of `jaxdist.parallel.strategies.STRATEGIES`
DP = Rules(params=_STACK, name="dp")
ZERO1 = Rules(params=_STACK, optimizer={**_STACK, **{name: BATCH_AXES for name in _FSDP}},
              unannotated_optimizer=BATCH_AXES, name="zero1")
FSDP = Rules(params={**_STACK, **_FSDP}, unannotated="fsdp", name="fsdp")
TP = Rules(params={**_STACK, **_TP}, name="tp")
# Megatron sequence parallelism: tp, and the residual stream between attention and MLP (norms,
# residual adds) split along the sequence over the same tensor axis
SP = Rules(params={**_STACK, **_TP}, activations={"seq": ("context", "tensor")},
           name="sp")
FSDP_TP = Rules(params={**_STACK, **_FSDP, **_TP}, unannotated="fsdp", name="fsdp_tp")
EP = Rules(params={**_STACK, **_EP, **_FSDP}, batch=(*BATCH_AXES, "expert"), unannotated="fsdp",
           name="ep")


def logical_to_mesh(logical: P, table: Mapping[str, MeshAxes], mesh: Mesh,
                    shape: tuple[int, ...] | None = None) -> P:
    """A PartitionSpec of logical names -> one of mesh axes (axes of size 1 dropped).

    With `shape`, storage-only axes (`STORAGE_AXES`: splitting there is a memory layout, not
    the model's semantics) skip a dimension they do not divide and go to a later named one, so
    FSDP of `wo` (layers, heads=12, kv, embed) over 8 devices splits `embed`; the tensor and
    pipeline axes never move (a dimension they do not divide is an error)."""
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical):
        axes = tuple(a for a in as_axis_tuple(table.get(name)) if mesh.shape[a] > 1 and a not in used)
        if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = tuple(a for a in axes if a not in STORAGE_AXES)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        ways = 1
        for axis in as_axis_tuple(axes):
            ways *= mesh.shape[axis]
        if dim % ways:
            raise UsageError(f"parameter {path} of shape {shape}: dimension {dim} does not divide "
                             f"over mesh axes {axes} ({ways} ways); change the model size or "
                             f"the mesh")


def split_largest_dim(shape: tuple[int, ...], axes: MeshAxes, mesh: Mesh,
                      min_size: int = 128) -> P:
    """`shape` split over `axes` on its largest dimension that divides; P() when none does, the
    axes are trivial, or the array has fewer than `min_size` elements."""
    axes = tuple(a for a in as_axis_tuple(axes) if mesh.shape[a] > 1)
    if not axes or math.prod(shape) < min_size:
        return P()
    ways = math.prod(mesh.shape[a] for a in axes)
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % ways == 0:
            spec: list[Any] = [None] * len(shape)
            spec[dim] = axes[0] if len(axes) == 1 else axes
            return P(*spec)
    return P()


def param_shardings(abstract_params: Any, logical_specs: Any, table: Mapping[str, MeshAxes],
                    mesh: Mesh, unannotated: MeshAxes = None, min_size: int = 128) -> Any:
    """NamedShardings for a parameter tree, from its logical specs; arrays without them are split
    on their largest dividing dimension over `unannotated` (None: replicated)."""
    def one(path, x, logical):
        if isinstance(logical, P) and len(logical) == len(x.shape):
            spec = logical_to_mesh(logical, table, mesh, tuple(x.shape))
        else:
            spec = split_largest_dim(tuple(x.shape), unannotated, mesh, min_size)
        _check_divisible(path_name(path), tuple(x.shape), spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_params, logical_specs)


def replicated_fraction(abstract: Any, shardings: Any) -> float:
    """The fraction of `abstract`'s bytes that its `shardings` leave whole on every device."""
    whole = total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        size = math.prod(x.shape) * x.dtype.itemsize
        total += size
        whole += size if s.is_fully_replicated else 0
    return whole / total if total else 0.0


def warn_if_mostly_replicated(what: str, strategy: str, fraction: float,
                              limit: float = 0.5) -> None:
    """A `ReplicationWarning` when `strategy` leaves more than `limit` of `what` replicated."""
    if fraction > limit:
        warnings.warn(
            f"strategy {strategy} leaves {100 * fraction:.0f}% of the {what} bytes replicated on "
            f"every device (its dimensions do not divide over the mesh axis, or the model names "
            f"no logical axes that the strategy splits); it trains, but saves little memory",
            ReplicationWarning, stacklevel=3)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """The batch's leading dimension split over the rules' batch axes."""
    axes = tuple(a for a in rules.batch if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many pieces the batch is split into."""
    ways = 1
    for axis in rules.batch:
        ways *= mesh.shape[axis]
    return ways
