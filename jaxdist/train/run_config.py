"""The flags every training run shares, in one typed config, and what they turn into.

An experiment's config subclasses `RunConfig` with its own fields (model, data); `validate_run`
checks the shared ones before any data is read, `trainer_options` / `fit_options` hand them to
`jaxdist.Trainer` and `jaxdist.fit`, and `run_main` is the whole command line: parse, set up the
devices, the compilation cache and the multi-process job, train, print one line, and exit with
the code of `jaxdist.errors` (0, 2 bad input, 65 diverged, 69 a `TransientError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxdist.cluster import ClusterSpec, configure_cpu_devices, enable_compilation_cache, initialize
from jaxdist.errors import (
    EXIT_DIVERGED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    TransientError,
    UsageError,
)
from jaxdist.parallel.strategies import DATA_PARALLEL_STRATEGIES, STRATEGY_NAMES
from jaxdist.train.loop import TrainingDiverged
from jaxdist.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    strategy: str = "jit"
    mesh: str = ""
    devices: int = 0
    cpu_devices: int = 0
    global_batch: int = 128
    epochs: float = 8.0
    seed: int = 0
    local_steps: int = 1
    grad_reduce: str = "mean"
    topk_fraction: float = 0.01
    powersgd_rank: int = 4
    microbatches: int = 1
    staleness: int = 0
    outer_optimizer: str = "none"
    outer_lr: float = 0.7
    max_steps: int = 0
    progress: bool = True
    progress_every: float = 30.0
    workdir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    keep_best: int = 1
    best_metric: str = "test_accuracy"
    best_mode: str = "max"
    restore_step: int = -1
    nonfinite_limit: int = 20
    compile_cache: str | None = None
    coordinator: str | None = None
    num_processes: int = 0
    process_id: int = -1
    init_timeout: int = 0
    heartbeat_timeout: int = 0
    bind: str | None = None
    logdir: str | None = None
    profile_steps: str = ""
    peak_tflops: float = 0.0
    hang_timeout: float = 300.0
    hang_action: str = "exit"
    optimizer: OptimizerConfig = OptimizerConfig(
        name="adam", learning_rate=3e-3, schedule="onecycle", warmup_fraction=0.15
    )


RUN_HELP = {
    "strategy": "data-parallel backend, or model-parallel sharding rules",
    "mesh": "model-parallel strategies: mesh shape, e.g. data=2,fsdp=2,tensor=2 "
            "(default: all devices on the strategy's own axis, tensor=2 for tp)",
    "devices": "number of devices (0: all)",
    "cpu_devices": "virtual CPU devices per process on hosts without accelerators "
                   "(0: $JAXDIST_CPU_DEVICES or 8)",
    "global_batch": "examples per step, summed over all devices",
    "epochs": "passes over the training set (may be fractional)",
    "local_steps": "local_sgd: average parameters every H steps",
    "grad_reduce": "shard_map: how gradients are averaged: mean (exact fp32), bf16, int8, topk "
                   "(with error feedback) or powersgd (with error feedback)",
    "topk_fraction": "grad_reduce topk: fraction of gradient entries each replica sends",
    "powersgd_rank": "grad_reduce powersgd: rank of the approximation",
    "microbatches": "accumulate gradients over this many parts of each replica's batch",
    "staleness": "apply each gradient this many steps late (deterministic asynchrony; 0: sync)",
    "outer_optimizer": "local_sgd: none (plain parameter averaging) or nesterov (DiLoCo's outer "
                       "step: SGD with Nesterov momentum 0.9 on the averaged movement)",
    "outer_lr": "local_sgd with an outer optimizer: its learning rate",
    "max_steps": "stop after this many steps (0: no limit)",
    "progress": "show progress: a bar on a terminal, else plain lines (see --progress_every)",
    "progress_every": "seconds between plain progress lines when output is not a terminal "
                      "(0: a line every step)",
    "workdir": "directory for checkpoints; rerunning with it resumes (default: no checkpoints)",
    "checkpoint_every": "save a checkpoint every N steps (asynchronously)",
    "keep_checkpoints": "how many checkpoints to keep",
    "keep_best": "also keep this many checkpoints with the best --best_metric",
    "best_metric": "the evaluation metric keep-best ranks by (see --best_mode)",
    "best_mode": "keep-best keeps the highest --best_metric (max) or the lowest (min)",
    "restore_step": "resume from this checkpoint step (-1: the latest readable one)",
    "nonfinite_limit": "after N consecutive skipped non-finite steps roll back to the last "
                       "checkpoint before them (or stop without one); 0: only log them",
    "coordinator": "multi-process: HOST:PORT of process 0 (default: $JAXDIST_COORDINATOR or "
                   "SLURM/MPI detection)",
    "num_processes": "multi-process: number of processes (0: from the environment)",
    "process_id": "multi-process: this process's id (-1: from the environment)",
    "init_timeout": "multi-process: seconds to wait for all processes to join "
                    "(0: $JAXDIST_INIT_TIMEOUT or 120)",
    "heartbeat_timeout": "multi-process: seconds without heartbeats before a process is lost "
                         "(0: $JAXDIST_HEARTBEAT_TIMEOUT or 30)",
    "bind": "multi-process, process 0: HOST:PORT the coordination service listens on (default: "
            "$JAXDIST_COORDINATOR_BIND, else the coordinator address's own interface; [::]:PORT "
            "for every interface). It has no authentication: keep it on a private network",
    "compile_cache": "directory of the persistent XLA compilation cache (default: "
                     "$JAXDIST_COMPILE_CACHE or ~/.cache/jaxdist/xla; 'off' disables it)",
    "logdir": "metrics.jsonl, TensorBoard event files, status files and profiles (default: "
              "<workdir>/logs with --workdir, else none)",
    "profile_steps": "A,B: capture a jax.profiler trace of steps A..B into <logdir>/profile",
    "peak_tflops": "peak TFLOP/s per device for the MFU estimate (0: a per-platform assumption)",
    "hang_timeout": "seconds without progress (3x before the first step) before the hang "
                    "watchdog acts (0: off)",
    "hang_action": "exit: write stacks and the verdict to <logdir>/status and exit 75 so the "
                   "launcher or scheduler restarts the job; report: only print the verdict",
    "optimizer": "optax optimizer",
    "learning_rate": "peak learning rate",
    "schedule": "learning-rate schedule",
}


def with_variant(cfg: RunConfig, variant: str, smoke: dict[str, Any]) -> RunConfig:
    """`cfg` itself (variant "" or "default"), or with the `smoke` fields replaced (variant
    "smoke": a few steps, for CI); another name is a ValueError."""
    if variant in ("", "default"):
        return cfg
    if variant == "smoke":
        return dataclasses.replace(cfg, **smoke)
    raise ValueError(f"unknown config variant {variant!r}; choose 'default' or 'smoke'")


def run_choices() -> dict[str, tuple[str, ...]]:
    from jaxdist.comm import REDUCERS

    return {"strategy": STRATEGY_NAMES, "grad_reduce": REDUCERS,
            "outer_optimizer": ("none", "nesterov"), "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES, "hang_action": ("exit", "report"),
            "best_mode": ("max", "min")}


def validate_run(cfg: RunConfig, num_devices: int) -> None:
    """Checks of the shared flags that need the device count, before any data is loaded.

    Unknown strategy/optimizer names are rejected by the flags' choices and, for direct calls, by
    `Trainer` / `make_optimizer` themselves. Every number must be finite (a NaN learning rate
    would train NaN steps, then stop; infinite epochs would never end), and the work and log
    dirs must be directories this process can create and write.
    """
    for flag, value in _float_fields(cfg):
        if not math.isfinite(value):
            raise UsageError(f"--{flag} must be a finite number, got {value}")
    if cfg.global_batch < 1 or cfg.global_batch % num_devices:
        raise UsageError(
            f"global batch {cfg.global_batch} does not divide over {num_devices} devices; "
            f"use a positive multiple of {num_devices}"
        )
    if cfg.epochs <= 0:
        raise UsageError(f"epochs must be positive, got {cfg.epochs}")
    if cfg.local_steps < 1:
        raise UsageError(f"local_steps must be at least 1, got {cfg.local_steps}")
    if cfg.checkpoint_every < 1 or cfg.keep_checkpoints < 1:  # also without --workdir: a typo
        raise UsageError("checkpoint_every and keep_checkpoints must be at least 1")
    if cfg.keep_best < 0 or cfg.nonfinite_limit < 0:
        raise UsageError("keep_best and nonfinite_limit must be >= 0")
    if cfg.mesh and cfg.strategy in DATA_PARALLEL_STRATEGIES:
        raise UsageError(f"--mesh is for the model-parallel strategies, not {cfg.strategy}")
    if cfg.grad_reduce != "mean" and cfg.strategy != "shard_map":
        raise UsageError(f"--grad_reduce {cfg.grad_reduce} runs inside the shard_map step; use "
                         f"--strategy shard_map (not {cfg.strategy})")
    if cfg.outer_optimizer != "none" and cfg.strategy != "local_sgd":
        raise UsageError("--outer_optimizer is for --strategy local_sgd")
    if cfg.microbatches < 1 or (cfg.global_batch // num_devices) % cfg.microbatches:
        raise UsageError(f"{cfg.global_batch // num_devices} examples per device do not split "
                         f"into {cfg.microbatches} microbatches")
    if cfg.staleness < 0:
        raise UsageError(f"staleness must be >= 0, got {cfg.staleness}")
    if cfg.profile_steps:
        from jaxdist.observe.metrics import parse_step_range

        try:
            parse_step_range(cfg.profile_steps)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not log_dir(cfg):
            raise UsageError("--profile_steps needs --logdir (or --workdir)")
    if cfg.peak_tflops < 0 or cfg.hang_timeout < 0 or cfg.progress_every < 0:
        raise UsageError("peak_tflops, hang_timeout and progress_every must be >= 0")
    for flag in ("workdir", "logdir"):
        check_directory(flag, getattr(cfg, flag), create=True)


def _float_fields(cfg: Any):
    """(flag, value) of every float in the config tree (tuples of floats included)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float):
                yield f.name, item


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
    if cfg.best_metric not in names:
        raise UsageError(f"--best_metric {cfg.best_metric} is not a metric of this run's "
                         f"evaluation; choose one of {', '.join(sorted(names))}")


def eval_metric_names(eval_fn: Callable, build_model: Callable[[], Any], batch: Any,
                      prefix: str) -> tuple[str, ...]:
    """The names `jaxdist.fit(..., eval_prefix=prefix)` reports `eval_fn`'s metrics under,
    found by tracing it on shapes (`batch`: ShapeDtypeStructs, the mask last): no model is
    built and nothing is computed.

    Example:
        >>> eval_metric_names(mnist_eval, build, (images, labels, mask), "test")
        ('test_accuracy', 'test_loss')
    """
    import jax
    from flax import nnx

    from jaxdist.train.fit import _means

    graphdef, state = nnx.split(nnx.eval_shape(build_model))
    sums = jax.eval_shape(lambda s, b: eval_fn(nnx.merge(graphdef, s), b), state, batch)
    return tuple(sorted(_means(dict.fromkeys(sums, 1.0), prefix)))


def log_dir(cfg: RunConfig) -> str | None:
    """--logdir, else <workdir>/logs with a work dir, else None (nothing written)."""
    if cfg.logdir:
        return cfg.logdir
    return str(Path(cfg.workdir) / "logs") if cfg.workdir else None


def trainer_options(cfg: RunConfig) -> dict[str, Any]:
    """`jaxdist.Trainer` keyword arguments of the shared flags (strategy, mesh, reducers, ...)."""
    options: dict[str, Any] = {"strategy": cfg.strategy, "mesh": cfg.mesh or None,
                               "microbatches": cfg.microbatches}
    if cfg.grad_reduce != "mean":
        from jaxdist.comm import make_reducer

        options["grad_reducer"] = make_reducer(cfg.grad_reduce, topk_fraction=cfg.topk_fraction,
                                               powersgd_rank=cfg.powersgd_rank)
    if cfg.strategy == "local_sgd":
        options["local_steps"] = cfg.local_steps
        if cfg.outer_optimizer == "nesterov":
            import optax

            options["outer_optimizer"] = optax.sgd(cfg.outer_lr, momentum=0.9, nesterov=True)
    return options


def fit_options(cfg: RunConfig) -> dict[str, Any]:
    """`jaxdist.fit` keyword arguments of the shared flags (cadence, work dir, monitor, ...)."""
    from jaxdist.observe.metrics import parse_step_range

    return dict(epochs=cfg.epochs, steps=cfg.max_steps or None, workdir=cfg.workdir,
                checkpoint_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                keep_best=cfg.keep_best, best_metric=cfg.best_metric, best_mode=cfg.best_mode,
                restore_step=cfg.restore_step, nonfinite_limit=cfg.nonfinite_limit,
                progress=cfg.progress, progress_every=cfg.progress_every, logdir=log_dir(cfg),
                profile_steps=parse_step_range(cfg.profile_steps),
                hang_timeout=cfg.hang_timeout,
                hang_action=cfg.hang_action, peak_tflops=cfg.peak_tflops)


def with_staleness(cfg: RunConfig, tx):
    """`tx` applying each gradient `cfg.staleness` steps late (0: `tx` itself)."""
    if not cfg.staleness:
        return tx
    import optax

    from jaxdist.comm import stale_gradients

    return optax.chain(stale_gradients(cfg.staleness), tx)


def cluster_spec(cfg: RunConfig) -> ClusterSpec:
    """The flags' part of how to join a multi-process job; the environment fills the rest."""
    return ClusterSpec(
        coordinator=cfg.coordinator,
        num_processes=cfg.num_processes or None,
        process_id=None if cfg.process_id < 0 else cfg.process_id,
        init_timeout=cfg.init_timeout or None,
        heartbeat_timeout=cfg.heartbeat_timeout or None,
        bind_address=cfg.bind or None,
    )


def run_main(argv: list[str] | None, configs: Callable[[str], RunConfig], *, description: str,
             train: Callable[[Any], dict], summary: Callable[[dict], str],
             choices: dict | None = None, help_text: dict | None = None) -> int:
    """Parses flags over `configs`, joins the job, trains; prints `summary(result)` on process 0.

    Exit status (`jaxdist.errors`): 0 done (or stopped by a signal, with a checkpoint), 2 bad
    input, 65 diverged, 69 a `TransientError` (e.g. the job not joined in time), 75 ended by the
    hang watchdog;
    an uncaught exception exits 1 (restarted, like 69 and 75).
    """
    from jaxdist.config import parse_config

    cfg = parse_config(configs, argv, description=description,
                       choices={**run_choices(), **(choices or {})},
                       help_text={**RUN_HELP, **(help_text or {})})
    try:
        configure_cpu_devices(cfg.cpu_devices or None)
        initialize(cluster_spec(cfg))  # joins a multi-process job when there is one
        if cfg.compile_cache != "off":  # after joining: the cache is keyed by process
            enable_compilation_cache(cfg.compile_cache)
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
