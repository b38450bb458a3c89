"""The flags every training run shares: one config tree of component configs.

`RunConfig` holds the run's length and batch, and the configs of its parts — `parallel`
(strategy, mesh, gradient reduction), `optimizer`, `checkpoint`, `eval`, `observe`, `guard` and
`cluster` — each describing its own flags (help from the docstring under each field, choices from
`Literal` types) and validating itself. Flags are named by leaf field as before
(`--hang_timeout 60`, `--checkpoint_every 100`). An experiment's config subclasses `RunConfig`
with its own fields (model, data); `run_main` is the whole command line: parse, set up the
devices, the compilation cache and the multi-process job, train, print one line, and exit with
the code of `jaxdist.errors` (0, 2 bad input, 65 diverged, 69 a `TransientError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from jaxdist.cluster import ClusterSpec, configure_cpu_devices, enable_compilation_cache, initialize
from jaxdist.comm import REDUCERS
from jaxdist.config import parse_config, replace_flags
from jaxdist.errors import (
    EXIT_DIVERGED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    TransientError,
    UsageError,
)
from jaxdist.observe.monitor import ObserveConfig
from jaxdist.parallel.strategies import STRATEGIES
from jaxdist.train.checkpointing import CheckpointConfig
from jaxdist.train.evaluation import EvalConfig, eval_means
from jaxdist.train.guard import GuardConfig, TrainingDiverged
from jaxdist.train.optim import OptimizerConfig

StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]  # the one registry
Reducer = Literal[tuple(REDUCERS)]  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the step is laid out over the devices, and how gradients travel."""

    strategy: StrategyName = "jit"
    """a strategy of jaxdist.STRATEGIES: data-parallel (jit, shard_map, pmap, local_sgd) or
    model-parallel sharding rules (dp, zero1, fsdp, tp, sp, fsdp_tp)"""
    mesh: str = ""
    """model-parallel strategies: mesh shape, e.g. data=2,fsdp=2,tensor=2 (default: all devices
    on the strategy's own axis, tensor=2 for tp)"""
    devices: int = 0
    """number of devices (0: all)"""
    microbatches: int = 1
    """accumulate gradients over this many parts of each replica's batch"""
    staleness: int = 0
    """apply each gradient this many steps late (deterministic asynchrony; 0: sync)"""
    grad_reduce: Reducer = "mean"
    """shard_map: how gradients are averaged: mean (exact fp32), bf16, int8, topk (with error
    feedback) or powersgd (with error feedback)"""
    topk_fraction: float = 0.01
    """grad_reduce topk: fraction of gradient entries each replica sends"""
    powersgd_rank: int = 4
    """grad_reduce powersgd: rank of the approximation"""
    local_steps: int = 1
    """local_sgd: average parameters every H steps"""
    outer_optimizer: Literal["none", "nesterov"] = "none"
    """local_sgd: none (plain parameter averaging) or nesterov (DiLoCo's outer step: SGD with
    Nesterov momentum 0.9 on the averaged movement)"""
    outer_lr: float = 0.7
    """local_sgd with an outer optimizer: its learning rate"""

    def validate(self, num_devices: int, global_batch: int) -> None:
        data_parallel = STRATEGIES[self.strategy].parallelism == "data"
        if self.mesh and data_parallel:
            raise UsageError(f"--mesh is for the model-parallel strategies, not {self.strategy}")
        if self.grad_reduce != "mean" and self.strategy != "shard_map":
            raise UsageError(f"--grad_reduce {self.grad_reduce} runs inside the shard_map step; "
                             f"use --strategy shard_map (not {self.strategy})")
        if self.outer_optimizer != "none" and self.strategy != "local_sgd":
            raise UsageError("--outer_optimizer is for --strategy local_sgd")
        if self.local_steps < 1:
            raise UsageError(f"local_steps must be at least 1, got {self.local_steps}")
        per_device = global_batch // num_devices
        if self.microbatches < 1 or per_device % self.microbatches:
            raise UsageError(f"{per_device} examples per device do not split into "
                             f"{self.microbatches} microbatches")
        if self.staleness < 0:
            raise UsageError(f"staleness must be >= 0, got {self.staleness}")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How this process joins a multi-process job, and what it runs on."""

    cpu_devices: int = 0
    """virtual CPU devices per process on hosts without accelerators (0: $JAXDIST_CPU_DEVICES
    or 8)"""
    coordinator: str | None = None
    """multi-process: HOST:PORT of process 0 (default: $JAXDIST_COORDINATOR or SLURM/MPI
    detection)"""
    num_processes: int = 0
    """multi-process: number of processes (0: from the environment)"""
    process_id: int = -1
    """multi-process: this process's id (-1: from the environment)"""
    init_timeout: int = 0
    """multi-process: seconds to wait for all processes to join (0: $JAXDIST_INIT_TIMEOUT or
    120)"""
    heartbeat_timeout: int = 0
    """multi-process: seconds without heartbeats before a process is lost (0:
    $JAXDIST_HEARTBEAT_TIMEOUT or 30)"""
    bind: str | None = None
    """multi-process, process 0: HOST:PORT the coordination service listens on (default:
    $JAXDIST_COORDINATOR_BIND, else the coordinator address's own interface; [::]:PORT for every
    interface). It has no authentication: keep it on a private network"""
    compile_cache: str | None = None
    """directory of the persistent XLA compilation cache (default: $JAXDIST_COMPILE_CACHE or
    ~/.cache/jaxdist/xla; 'off' disables it)"""

    def spec(self) -> ClusterSpec:
        """The flags' part of how to join a multi-process job; the environment fills the rest."""
        return ClusterSpec(
            coordinator=self.coordinator,
            num_processes=self.num_processes or None,
            process_id=None if self.process_id < 0 else self.process_id,
            init_timeout=self.init_timeout or None,
            heartbeat_timeout=self.heartbeat_timeout or None,
            bind_address=self.bind or None,
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run: its length and batch, and the configs of its parts."""

    global_batch: int = 128
    """examples per step, summed over all devices"""
    epochs: float = 8.0
    """passes over the training set (may be fractional)"""
    max_steps: int = 0
    """stop after this many steps (0: no limit)"""
    seed: int = 0
    """the model's initialization and the data's order"""
    parallel: ParallelConfig = ParallelConfig()
    optimizer: OptimizerConfig = OptimizerConfig(
        name="adam", learning_rate=3e-3, schedule="onecycle", warmup_fraction=0.15)
    """optax optimizer"""
    checkpoint: CheckpointConfig = CheckpointConfig(keep_best=1, best_metric="test_accuracy")
    eval: EvalConfig = EvalConfig()
    observe: ObserveConfig = ObserveConfig()
    guard: GuardConfig = GuardConfig()
    cluster: ClusterConfig = ClusterConfig()

    def validate(self, num_devices: int) -> None:
        """Every component's checks, before any data is loaded.

        Every number must be finite (a NaN learning rate would train NaN steps, then stop;
        infinite epochs would never end), and the work and log dirs must be directories this
        process can create and write.
        """
        for flag, value in _float_fields(self):
            if not math.isfinite(value):
                raise UsageError(f"--{flag} must be a finite number, got {value}")
        if self.global_batch < 1 or self.global_batch % num_devices:
            raise UsageError(
                f"global batch {self.global_batch} does not divide over {num_devices} devices; "
                f"use a positive multiple of {num_devices}")
        if self.epochs <= 0:
            raise UsageError(f"epochs must be positive, got {self.epochs}")
        self.parallel.validate(num_devices, self.global_batch)
        for component in (self.checkpoint, self.eval, self.observe, self.guard):
            component.validate()
        if self.observe.profile_steps and not self.logdir:
            raise UsageError("--profile_steps needs --logdir (or --workdir)")
        check_directory("workdir", self.checkpoint.workdir, create=True)
        check_directory("logdir", self.observe.logdir, create=True)

    @property
    def logdir(self) -> str | None:
        """Where the run writes its logs (`ObserveConfig.logdir_for` the work dir)."""
        return self.observe.logdir_for(self.checkpoint.workdir)

    def fit_options(self) -> dict[str, Any]:
        """`jaxdist.fit`'s keyword arguments: the length and the services' configs."""
        return dict(epochs=self.epochs, steps=self.max_steps or None, eval=self.eval,
                    checkpoint=self.checkpoint, guard=self.guard, observe=self.observe)


def _float_fields(cfg: Any):
    """(flag, value) of every float in the config tree (tuples of floats included)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float):
                yield f.metadata.get("flag", f.name), item


def with_variant(cfg: RunConfig, variant: str, smoke: dict[str, Any]) -> RunConfig:
    """`cfg` itself (variant "" or "default"), or with the `smoke` flags replaced (variant
    "smoke": a few steps, for CI); another name is a ValueError."""
    if variant in ("", "default"):
        return cfg
    if variant == "smoke":
        return replace_flags(cfg, **smoke)
    raise ValueError(f"unknown config variant {variant!r}; choose 'default' or 'smoke'")


def check_directory(flag: str, where: str | None, *, create: bool = False) -> None:
    """A directory flag must name a directory, or a path that can become one; with `create`,
    it is made now (as the run would a moment later) and must be writable, so a path that cannot
    be created (under a file, a read-only or special file system, no permission) is one line
    before any data is read, not a traceback after."""
    if not where:
        return
    path = Path(where)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        shown = "" if existing == path else f" ({existing} is a file)"
        raise UsageError(f"--{flag} {where} is not a directory{shown}")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--{flag} {where} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag} {where} is not writable")


def check_best_metric(cfg: RunConfig, names: Sequence[str]) -> None:
    """--best_metric must be one of `names`, the run's evaluation metrics (see
    `eval_metric_names`): a typo would otherwise keep no best checkpoint, silently."""
    if cfg.checkpoint.best_metric not in names:
        raise UsageError(f"--best_metric {cfg.checkpoint.best_metric} is not a metric of this "
                         f"run's evaluation; choose one of {', '.join(sorted(names))}")


def eval_metric_names(eval_fn: Callable, build_model: Callable[[], Any], batch: Any,
                      prefix: str) -> tuple[str, ...]:
    """The names `jaxdist.fit(..., eval=EvalConfig(prefix=prefix))` reports `eval_fn`'s metrics
    under, found by tracing it on shapes (`batch`: ShapeDtypeStructs, the mask last): no model
    is built and nothing is computed.

    Example:
        >>> eval_metric_names(mnist_eval, build, (images, labels, mask), "test")
        ('test_accuracy', 'test_loss')
    """
    import jax
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(build_model))
    sums = jax.eval_shape(lambda s, b: eval_fn(nnx.merge(graphdef, s), b), state, batch)
    return tuple(sorted(eval_means(dict.fromkeys(sums, 1.0), prefix)))


def trainer_options(cfg: RunConfig) -> dict[str, Any]:
    """`jaxdist.Trainer` keyword arguments of the shared flags: the strategy value of --strategy
    with the options its flags give (--grad_reduce: shard_map's reducer; --local_steps,
    --outer_optimizer: local_sgd's), the mesh and the microbatches."""
    p = cfg.parallel
    strategy = STRATEGIES[p.strategy]
    if p.grad_reduce != "mean":  # validate refuses it for any strategy but shard_map
        from jaxdist.comm import make_reducer

        strategy = dataclasses.replace(strategy, reducer=make_reducer(
            p.grad_reduce, topk_fraction=p.topk_fraction, powersgd_rank=p.powersgd_rank))
    if p.strategy == "local_sgd":
        outer = None
        if p.outer_optimizer == "nesterov":
            import optax

            outer = optax.sgd(p.outer_lr, momentum=0.9, nesterov=True)
        strategy = dataclasses.replace(strategy, every=p.local_steps, outer=outer)
    return {"strategy": strategy, "mesh": p.mesh or None, "microbatches": p.microbatches}


def with_staleness(cfg: RunConfig, tx):
    """`tx` applying each gradient `cfg.parallel.staleness` steps late (0: `tx` itself)."""
    if not cfg.parallel.staleness:
        return tx
    import optax

    from jaxdist.comm import stale_gradients

    return optax.chain(stale_gradients(cfg.parallel.staleness), tx)


def run_main(argv: list[str] | None, configs: Callable[[str], RunConfig], *, description: str,
             train: Callable[[Any], dict], summary: Callable[[dict], str],
             choices: dict | None = None) -> int:
    """Parses flags over `configs`, joins the job, trains; prints `summary(result)` on process 0.

    Exit status (`jaxdist.errors`): 0 done (or stopped by a signal, with a checkpoint), 2 bad
    input, 65 diverged, 69 a `TransientError` (e.g. the job not joined in time), 75 ended by the
    hang watchdog; an uncaught exception exits 1 (restarted, like 69 and 75).
    """
    cfg = parse_config(configs, argv, description=description, choices=choices)
    try:
        configure_cpu_devices(cfg.cluster.cpu_devices or None)
        initialize(cfg.cluster.spec())  # joins a multi-process job when there is one
        if cfg.cluster.compile_cache != "off":  # after joining: the cache is keyed by process
            enable_compilation_cache(cfg.cluster.compile_cache)
        result = train(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except TransientError as e:
        print(f"error: {e} (exit {EXIT_UNAVAILABLE}: a restart may succeed)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    import jax

    if jax.process_index() == 0:
        print(summary(result), flush=True)
    return 0
