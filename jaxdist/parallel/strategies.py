"""The one strategy vocabulary: every way jaxdist lays out a train step is a value that carries
its own options, and `STRATEGIES` names the defaults.

    Trainer(model, tx, loss_fn, strategy="fsdp")                      # a name: its default value
    Trainer(model, tx, loss_fn, strategy=LocalSGD(every=8))           # a value with options
    Trainer(model_fn, tx, loss_fn, strategy=Pipeline(rules="fsdp", schedule="1f1b"),
            mesh="fsdp=2,pipeline=4")

| value        | options                                  | what it does                           |
|--------------|------------------------------------------|----------------------------------------|
| `Jit()`      |                                          | `jax.jit` over a data mesh             |
| `ShardMap()` | `reducer`, `batch_stats`                 | `lax.pmean` inside `jax.shard_map`     |
| `Pmap()`     | `batch_stats`                            | `jax.pmap`, the per-device program     |
| `LocalSGD()` | `every`, `outer`, `average_opt_state`    | averaging every H steps (DiLoCo)       |
| `Rules(...)` | the tables of `jaxdist.parallel.rules`,  | dp, zero1, fsdp, tp, sp, fsdp_tp, ep,  |
|              | `context_attention`                      | your own; on a mesh with context > 1   |
|              |                                          | the sequence split over it (ring or    |
|              |                                          | all-gather attention)                  |
| `Pipeline()` | `microbatches`, `schedule`,              | the layer stack over pipeline stages   |
|              | `virtual_stages`, `rules`                |                                        |

Every value answers the same questions, so no caller keeps a list of names:
- `name`: what the trainer reports; `STRATEGIES[name]` is the default value of that name.
- `layout`: "rules", one `jax.jit` program over a named mesh, parameters, gradients and
  optimizer state laid out by sharding rules (`jaxdist.parallel.sharded`); or "mapped", each
  device runs the step on its shard inside `jax.shard_map` / `jax.pmap` with the collectives
  written out (`jaxdist.parallel.backends`): what gradient compression, per-device batch
  statistics and local SGD need.
- `parallelism`: "data", the whole model on every device and the batch over the `data` axis
  (jit, shard_map, pmap, local_sgd); or "model", the state laid out over a named mesh of
  `data`, `fsdp`, `expert`, `context`, `tensor` and `pipeline` axes (the rules strategies,
  `Pipeline`).
- `default_mesh(n)`, `mesh_for(mesh, devices)` and `build(...)`: the mesh it runs on and the
  `StepLayout` (step, state layout, initial state) it gives the trainer.

Each value checks its options when it is made: a bad one, or an option of another strategy, is
a one-line `jaxdist.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Literal, Sequence, get_args

import jax
import optax
from jax.sharding import Mesh

from jaxdist.comm.reducers import GradReducer
from jaxdist.core.axes import DATA_AXIS
from jaxdist.errors import UsageError
from jaxdist.parallel import rules as _rules
from jaxdist.parallel.backends import (
    BatchStats,
    StepLayout,
    diloco_init,
    local_sgd_backend,
    mapped_layout,
    pmap_backend,
    shard_map_backend,
    stacked_init,
)
from jaxdist.parallel.mesh import data_mesh, make_mesh, parse_mesh_shape
from jaxdist.parallel.pipeline import PIPELINE_AXIS
from jaxdist.parallel.rules import Rules
from jaxdist.parallel.sharded import rules_layout

PipelineSchedule = Literal["gpipe", "1f1b", "interleaved"]
LayoutKind = Literal["rules", "mapped"]
Parallelism = Literal["data", "model"]

_OPTION_OF: dict[str, str] = {}  # option -> the strategy class that has it


def _strategy(cls):
    """A frozen, keyword-only dataclass whose options are checked when it is made: an option it
    does not have names the strategy that has it."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    own = tuple(f.name for f in dataclasses.fields(cls))
    for option in own:
        _OPTION_OF.setdefault(option, cls.__name__)
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, **options):
        for option in options:
            if option not in own:
                whose = (f"an option of {_OPTION_OF[option]}" if option in _OPTION_OF
                         else "no strategy has it")
                has = f"its options: {', '.join(own)}" if own else "it has no options"
                raise UsageError(f"{cls.__name__} has no option {option!r} ({whose}); {has}")
        init(self, **options)

    cls.__init__ = checked_init
    return cls


def _one_of(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _replica_mesh(name: str, mesh: str | Mesh | None, devices: Sequence[jax.Device],
                  make: Callable[[Sequence[jax.Device]], Mesh]) -> Mesh:
    """The mesh of a data-parallel strategy: every device on the data axis; a mesh that splits
    anything else is an error."""
    if isinstance(mesh, Mesh):
        others = {a: s for a, s in mesh.shape.items() if a != DATA_AXIS and s > 1}
        if others:
            raise UsageError(f"strategy {name} runs over the data axis only; the mesh also has "
                             f"{others}")
    elif mesh:
        shape = parse_mesh_shape(mesh)
        if any(s > 1 for a, s in shape.items() if a != DATA_AXIS):
            raise UsageError(f"strategy {name} runs over the data axis only, not {mesh}")
        if shape.get(DATA_AXIS, 1) != len(devices):
            make_mesh(shape, devices)  # the usual message about the device count
    return make(devices)


class _Replicated:
    """What the data-parallel values share: the data mesh."""

    name: ClassVar[str]
    parallelism: ClassVar[Parallelism] = "data"

    def default_mesh(self, devices: int) -> str:
        return f"{DATA_AXIS}={devices}"

    def mesh_for(self, mesh: str | Mesh | None, devices: Sequence[jax.Device]) -> Mesh:
        """Every device on the data axis (`mesh`, if given, may say only that)."""
        return _replica_mesh(self.name, mesh, devices, self._data_mesh)

    @staticmethod
    def _data_mesh(devices: Sequence[jax.Device]) -> Mesh:
        """The mapped layouts' 1-D mesh."""
        return data_mesh(devices)


@_strategy
class Jit(_Replicated):
    """`jax.jit` over a data mesh: replicated state, the batch split over `data`, XLA inserts the
    gradient all-reduce (the rules layout with `dp`'s rules on a data-only mesh)."""

    name: ClassVar[str] = "jit"
    layout: ClassVar[LayoutKind] = "rules"

    @staticmethod
    def _data_mesh(devices: Sequence[jax.Device]) -> Mesh:
        """The rules layout's named mesh, every axis but data of size 1."""
        return make_mesh({DATA_AXIS: len(devices)}, devices)

    def build(self, model, tx, loss_fn, mesh, eval_fn, step_options) -> StepLayout:
        return rules_layout(model, tx, loss_fn, mesh, _rules.DP, self.name, eval_fn, step_options)


@_strategy
class ShardMap(_Replicated):
    """`jax.shard_map`: each device runs the step on its shard and `lax.pmean`s the gradients as
    one flat buffer per dtype.

    Attributes:
        reducer: how gradients are averaged instead (a `jaxdist.comm.GradReducer`: bf16, int8,
            top-k, PowerSGD); None: an exact fp32 mean.
        batch_stats: BatchNorm statistics over the "global" batch (as one device computes them)
            or each device's own shard ("per_device").
    """

    name: ClassVar[str] = "shard_map"
    layout: ClassVar[LayoutKind] = "mapped"
    reducer: GradReducer | None = None
    batch_stats: BatchStats = "global"

    def __post_init__(self):
        _one_of("batch_stats", self.batch_stats, get_args(BatchStats))
        if self.reducer is not None and not isinstance(self.reducer, GradReducer):
            raise UsageError(f"reducer must be a jaxdist.comm.GradReducer (e.g. int8_reduce()), "
                             f"got {type(self.reducer).__name__}")

    def build(self, model, tx, loss_fn, mesh, eval_fn, step_options) -> StepLayout:
        reducer = self.reducer
        return mapped_layout(
            model, tx, loss_fn, mesh, eval_fn, step_options, shard_map_backend,
            batch_stats=self.batch_stats,
            comm_init=None if reducer is None else stacked_init(reducer.init, mesh.size),
            grad_reduce=None if reducer is None else reducer.update)


@_strategy
class Pmap(_Replicated):
    """`jax.pmap` + `lax.pmean`, the classic per-device program (state carries a leading replica
    axis).

    Attributes:
        batch_stats: BatchNorm statistics over the "global" batch or each device's own shard
            ("per_device").
    """

    name: ClassVar[str] = "pmap"
    layout: ClassVar[LayoutKind] = "mapped"
    batch_stats: BatchStats = "global"

    def __post_init__(self):
        _one_of("batch_stats", self.batch_stats, get_args(BatchStats))

    def build(self, model, tx, loss_fn, mesh, eval_fn, step_options) -> StepLayout:
        return mapped_layout(model, tx, loss_fn, mesh, eval_fn, step_options, pmap_backend,
                             batch_stats=self.batch_stats)


@_strategy
class LocalSGD(_Replicated):
    """Each replica steps alone on its shard; every `every` steps the parameters (and batch
    statistics) are averaged. Optimizer state stays per replica.

    Attributes:
        every: H, the steps between averaging points (1: every step).
        outer: DiLoCo's outer optimizer, applied to the replicas' mean movement (e.g.
            `optax.sgd(0.7, momentum=0.9, nesterov=True)`); None: plain averaging.
        average_opt_state: also average the optimizer state at each averaging point.
    """

    name: ClassVar[str] = "local_sgd"
    layout: ClassVar[LayoutKind] = "mapped"
    every: int = 1
    outer: optax.GradientTransformation | None = None
    average_opt_state: bool = False

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise UsageError(f"LocalSGD(every=...) must be an integer >= 1, got {self.every!r}")
        if self.outer is not None and not isinstance(self.outer, optax.GradientTransformation):
            raise UsageError(f"outer must be an optax optimizer (e.g. optax.sgd(0.7)), got "
                             f"{type(self.outer).__name__}")
        if not isinstance(self.average_opt_state, bool):
            raise UsageError(f"average_opt_state must be True or False, got "
                             f"{self.average_opt_state!r}")

    def build(self, model, tx, loss_fn, mesh, eval_fn, step_options) -> StepLayout:
        backend = functools.partial(local_sgd_backend, every=self.every,
                                    average_opt_state=self.average_opt_state, outer=self.outer)
        return mapped_layout(model, tx, loss_fn, mesh, eval_fn, step_options, backend,
                             batch_stats="per_device",  # replicas are apart until averaged
                             comm_init=None if self.outer is None else diloco_init(self.outer))


@_strategy
class Pipeline:
    """The layer stack split over the mesh's `pipeline` axis (S > 1 stages), the other axes laid
    out by `rules`. A model pipelines when it runs its stack through
    `jaxdist.core.layout.run_layers`. Any rules strategy on a mesh with pipeline > 1 is this with
    the default options.

    Attributes:
        microbatches: M, microbatches per step through the pipeline (None: 2 S).
        schedule: "gpipe" (all forwards, then all backwards), "1f1b" (each backward as soon as
            it can run: at most 2 S - 1 microbatches' activations per stage, whatever M) or
            "interleaved" (`virtual_stages` chunks per device, a smaller bubble).
        virtual_stages: V, chunks of layers per device of the interleaved schedule (device d
            holds chunks d, d + S, ...); the bubble is (S - 1) / (V M + S - 1).
        rules: the sharding rules of the other axes: a rules strategy's name or a `Rules`.
    """

    layout: ClassVar[LayoutKind] = "rules"
    parallelism: ClassVar[Parallelism] = "model"
    microbatches: int | None = None
    schedule: PipelineSchedule = "gpipe"
    virtual_stages: int = 2
    rules: Rules | str = "dp"

    def __post_init__(self):
        if self.microbatches is not None and (
                isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int)
                or self.microbatches < 1):
            raise UsageError(f"Pipeline(microbatches=...) must be an integer >= 1 or None, got "
                             f"{self.microbatches!r}")
        _one_of("schedule", self.schedule, get_args(PipelineSchedule))
        if (isinstance(self.virtual_stages, bool) or not isinstance(self.virtual_stages, int)
                or self.virtual_stages < 1):
            raise UsageError(f"Pipeline(virtual_stages=...) must be an integer >= 1, got "
                             f"{self.virtual_stages!r}")
        rules = resolve(self.rules) if isinstance(self.rules, str) else self.rules
        if not isinstance(rules, Rules):
            raise UsageError(f"Pipeline lays out the other axes by sharding rules ("
                             f"{', '.join(_names_of('model'))} or Rules(...)), not {self.rules!r}")
        object.__setattr__(self, "rules", rules)

    @property
    def name(self) -> str:
        return self.rules.name

    def default_mesh(self, devices: int) -> str:
        return f"{PIPELINE_AXIS}={devices}"

    def mesh_for(self, mesh: str | Mesh | None, devices: Sequence[jax.Device]) -> Mesh:
        return self.rules.mesh_for(mesh or self.default_mesh(len(devices)), devices)

    def build(self, model, tx, loss_fn, mesh, eval_fn, step_options) -> StepLayout:
        if mesh.shape[PIPELINE_AXIS] < 2:
            raise UsageError(f"Pipeline needs a mesh with {PIPELINE_AXIS} > 1 (e.g. "
                             f"data=2,pipeline=4), not {dict(mesh.shape)}")
        if mesh.shape["context"] > 1 and self.schedule != "1f1b":
            # attention's shard_map over context inside this schedule's shard_map over pipeline:
            # jax 0.12 fails to lower its gradient (an axis bound twice); 1F1B's stages lower
            raise UsageError(f"context parallelism inside a pipeline needs schedule='1f1b', "
                             f"not {self.schedule!r}")
        return rules_layout(model, tx, loss_fn, mesh, self.rules, self.name, eval_fn,
                            step_options, pipeline_microbatches=self.microbatches,
                            pipeline_schedule=self.schedule,
                            pipeline_virtual_stages=self.virtual_stages)


Strategy = Jit | ShardMap | Pmap | LocalSGD | Rules | Pipeline

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Jit(), ShardMap(), Pmap(), LocalSGD(),
    _rules.DP, _rules.ZERO1, _rules.FSDP, _rules.TP, _rules.SP, _rules.FSDP_TP, _rules.EP,
)}


def _names_of(parallelism: Parallelism) -> list[str]:
    return [name for name, s in STRATEGIES.items() if s.parallelism == parallelism]


def resolve(strategy: str | Strategy) -> Strategy:
    """The strategy value of a name of `STRATEGIES`, or `strategy` itself when it is one.

    Example:
        >>> resolve("local_sgd")
        LocalSGD(every=1, outer=None, average_opt_state=False)
    """
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)}, or pass a value such as Rules(...)")
        return STRATEGIES[strategy]
    if not isinstance(strategy, Strategy):
        raise UsageError(f"strategy must be a name ({', '.join(STRATEGIES)}) or a strategy "
                         f"value (Jit(), ShardMap(), Pmap(), LocalSGD(), Rules(...), "
                         f"Pipeline()), got {type(strategy).__name__}")
    return strategy
