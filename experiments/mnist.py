"""Train the classic MNIST CNN data-parallel on every available device.

    python -m experiments.mnist                          # 8 virtual CPU devices on a CPU machine
    python -m experiments.mnist --strategy shard_map --devices 4 --global_batch 256
    python -m experiments.mnist --config smoke           # a few steps, for CI
    python -m experiments.mnist --model wide_cnn --strategy fsdp --mesh data=2,fsdp=4

On a machine without accelerators the job runs on `--cpu_devices` (default 8) virtual CPU devices.
Data-parallel strategies (jit, shard_map, pmap, local_sgd) replicate the model; the model-parallel
ones (dp, zero1, fsdp, tp, fsdp_tp) lay it out over `--mesh` by sharding rules.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from jaxdist.cluster import ClusterSpec, configure_cpu_devices, enable_compilation_cache, initialize
from jaxdist.errors import UsageError
from jaxdist.parallel.backends import STRATEGIES
from jaxdist.train.loop import TrainingDiverged
from jaxdist.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig

# where this repository's CI keeps prepared datasets, looked in after TFDS's own lookup
DATA_FALLBACKS = (Path(__file__).resolve().parent.parent.parent / "shared" / "data" /
                  "tensorflow_datasets",)


@dataclasses.dataclass(frozen=True)
class MnistConfig:
    model: str = "cnn"
    vit_size: str = "tiny"
    strategy: str = "jit"
    mesh: str = ""
    devices: int = 0
    cpu_devices: int = 0
    global_batch: int = 128
    augment: str = "none"
    epochs: float = 8.0
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    local_steps: int = 1
    grad_reduce: str = "mean"
    topk_fraction: float = 0.01
    powersgd_rank: int = 4
    microbatches: int = 1
    staleness: int = 0
    outer_optimizer: str = "none"
    outer_lr: float = 0.7
    compute_dtype: str = "float32"
    eval_batch: int = 2000
    max_steps: int = 0
    eval_examples: int = 0
    progress: bool = True
    progress_every: float = 30.0
    workdir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    keep_best: int = 1
    restore_step: int = -1
    nonfinite_limit: int = 20
    compile_cache: str | None = None
    coordinator: str | None = None
    num_processes: int = 0
    process_id: int = -1
    init_timeout: int = 0
    heartbeat_timeout: int = 0
    logdir: str | None = None
    profile_steps: str = ""
    peak_tflops: float = 0.0
    hang_timeout: float = 300.0
    optimizer: OptimizerConfig = OptimizerConfig(
        name="adam", learning_rate=3e-3, schedule="onecycle", warmup_fraction=0.15
    )


HELP = {
    "model": "cnn (the classic CNN), wide_cnn, or vit",
    "vit_size": "ViT size (tiny, small, base, large)",
    "strategy": "data-parallel backend, or model-parallel sharding rules",
    "mesh": "model-parallel strategies: mesh shape, e.g. data=2,fsdp=2,tensor=2 "
            "(default: all devices on the strategy's own axis, tensor=2 for tp)",
    "devices": "number of devices (0: all)",
    "cpu_devices": "virtual CPU devices per process on hosts without accelerators "
                   "(0: $JAXDIST_CPU_DEVICES or 8)",
    "global_batch": "examples per step, summed over all devices",
    "augment": "training-set augmentation: none, or shift (random shifts of up to 2 pixels)",
    "epochs": "passes over the training set (may be fractional)",
    "data_dir": "TFDS data dir (default: $TFDS_DATA_DIR, then ~/tensorflow_datasets, then "
                "../shared/data/tensorflow_datasets beside the repository)",
    "download": "download and prepare MNIST if missing (needs internet and jaxdist[prepare])",
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
    "compute_dtype": "CNN: float32, or bfloat16 compute with float32 master weights",
    "eval_batch": "examples per evaluation batch",
    "max_steps": "stop after this many steps (0: no limit)",
    "eval_examples": "evaluate on the first N test examples (0: all)",
    "progress": "show progress: a bar on a terminal, else plain lines (see --progress_every)",
    "progress_every": "seconds between plain progress lines when output is not a terminal "
                      "(0: a line every step)",
    "workdir": "directory for checkpoints; rerunning with it resumes (default: no checkpoints)",
    "checkpoint_every": "save a checkpoint every N steps (asynchronously)",
    "keep_checkpoints": "how many checkpoints to keep",
    "keep_best": "also keep this many checkpoints with the best test accuracy",
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
    "compile_cache": "directory of the persistent XLA compilation cache (default: "
                     "$JAXDIST_COMPILE_CACHE or ~/.cache/jaxdist/xla; 'off' disables it)",
    "logdir": "metrics.jsonl, TensorBoard event files, status files and profiles (default: "
              "<workdir>/logs with --workdir, else none)",
    "profile_steps": "A,B: capture a jax.profiler trace of steps A..B into <logdir>/profile",
    "peak_tflops": "peak TFLOP/s per device for the MFU estimate (0: a per-platform assumption)",
    "hang_timeout": "seconds without progress before the watchdog prints which process is behind "
                    "and where (0: off)",
    "optimizer": "optax optimizer",
    "learning_rate": "peak learning rate",
    "schedule": "learning-rate schedule",
}


def with_variant(cfg: MnistConfig, variant: str) -> MnistConfig:
    """`cfg` itself, or its 'smoke' variant: a few steps on a slice of the test set."""
    if variant in ("", "default"):
        return cfg
    if variant == "smoke":
        return dataclasses.replace(cfg, epochs=1, max_steps=8, eval_examples=2000)
    raise ValueError(f"unknown config variant {variant!r}; choose 'default' or 'smoke'")


def get_config(variant: str = "") -> MnistConfig:
    """The default recipe, or a named variant (see `with_variant`)."""
    return with_variant(MnistConfig(), variant)


MODELS = ("cnn", "wide_cnn", "vit")


def model_builder(cfg: MnistConfig):
    """(name for messages, a function that builds the model)."""
    from flax import nnx

    from jaxdist.models import MnistCNN, ViT, WideCNN, param_count, vit_config

    if cfg.model == "vit":
        vit = vit_config(cfg.vit_size)
        name = f"ViT-{cfg.vit_size} ({param_count(vit) / 1e6:.2f}M params)"
        return name, lambda: ViT(vit, rngs=nnx.Rngs(cfg.seed))
    if cfg.model == "wide_cnn":
        return "wide CNN", lambda: WideCNN(rngs=nnx.Rngs(cfg.seed))
    if cfg.compute_dtype == "bfloat16":
        import jax.numpy as jnp

        return "CNN (bf16 compute)", lambda: MnistCNN(rngs=nnx.Rngs(cfg.seed), dtype=jnp.bfloat16)
    return "CNN", lambda: MnistCNN(rngs=nnx.Rngs(cfg.seed))


def make_trainer(cfg: MnistConfig, devices, tx):
    """The `jaxdist.Trainer` of the configured strategy, with its options."""
    from jaxdist import Trainer

    _, build = model_builder(cfg)
    reducer = outer = None
    if cfg.grad_reduce != "mean":
        from jaxdist.comm import make_reducer

        reducer = make_reducer(cfg.grad_reduce, topk_fraction=cfg.topk_fraction,
                               powersgd_rank=cfg.powersgd_rank)
    if cfg.outer_optimizer == "nesterov":
        import optax

        outer = optax.sgd(cfg.outer_lr, momentum=0.9, nesterov=True)
    local = {"local_steps": cfg.local_steps, "outer_optimizer": outer} if (
        cfg.strategy == "local_sgd") else {}
    model = build() if cfg.strategy in STRATEGIES else build  # model-parallel: born sharded
    return Trainer(model, tx, loss_fn, strategy=cfg.strategy, devices=devices,
                   mesh=cfg.mesh or None, eval_fn=eval_fn, microbatches=cfg.microbatches,
                   grad_reducer=reducer, **local)


# the MNIST loss and evaluation sums (`jaxdist.models.classification`), by their usual names
from jaxdist.models.classification import mnist_eval as eval_fn  # noqa: E402
from jaxdist.models.classification import mnist_loss as loss_fn  # noqa: E402


def validate(cfg: MnistConfig, num_devices: int) -> None:
    """Shape checks that need the device count, before any data is loaded.

    Unknown strategy/optimizer names are rejected by the flags' choices and, for direct calls, by
    `make_backend` / `make_optimizer` themselves.
    """
    if cfg.global_batch < 1 or cfg.global_batch % num_devices:
        raise UsageError(
            f"global batch {cfg.global_batch} does not divide over {num_devices} devices; "
            f"use a positive multiple of {num_devices}"
        )
    if cfg.eval_batch < 1 or cfg.eval_batch % num_devices:
        raise UsageError(f"eval batch {cfg.eval_batch} does not divide over {num_devices} devices")
    if cfg.epochs <= 0:
        raise UsageError(f"epochs must be positive, got {cfg.epochs}")
    if cfg.local_steps < 1:
        raise UsageError(f"local_steps must be at least 1, got {cfg.local_steps}")
    if cfg.checkpoint_every < 1 or cfg.keep_checkpoints < 1:  # also without --workdir: a typo
        raise UsageError("checkpoint_every and keep_checkpoints must be at least 1")
    if cfg.keep_best < 0 or cfg.nonfinite_limit < 0:
        raise UsageError("keep_best and nonfinite_limit must be >= 0")
    if cfg.mesh and cfg.strategy in STRATEGIES:
        raise UsageError(f"--mesh is for the model-parallel strategies, not {cfg.strategy}")
    if cfg.grad_reduce != "mean" and cfg.strategy != "shard_map":
        raise UsageError(f"--grad_reduce {cfg.grad_reduce} runs inside the shard_map step; use "
                         f"--strategy shard_map (not {cfg.strategy})")
    if cfg.outer_optimizer != "none" and cfg.strategy != "local_sgd":
        raise UsageError("--outer_optimizer is for --strategy local_sgd")
    if cfg.compute_dtype != "float32" and cfg.model != "cnn":
        raise UsageError("--compute_dtype is implemented for the CNN")
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
    for flag in ("workdir", "logdir", "data_dir"):
        _check_directory(flag, getattr(cfg, flag))


def _check_directory(flag: str, where: str | None) -> None:
    """A directory flag must name a directory, or a path that can become one."""
    if not where:
        return
    path = Path(where)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        shown = "" if existing == path else f" ({existing} is a file)"
        raise UsageError(f"--{flag} {where} is not a directory{shown}")


def log_dir(cfg: MnistConfig) -> str | None:
    """--logdir, else <workdir>/logs with a work dir, else None (nothing written)."""
    if cfg.logdir:
        return cfg.logdir
    return str(Path(cfg.workdir) / "logs") if cfg.workdir else None


def train(cfg: MnistConfig) -> dict:
    """Runs the experiment and returns its summary (also printed by `main`)."""
    import jax

    from jaxdist import data, fit
    from jaxdist.cluster import select_devices
    from jaxdist.data.augment import make_augment
    from jaxdist.observe.metrics import parse_step_range
    from jaxdist.parallel import default_mesh, make_mesh
    from jaxdist.train import epoch_end_steps, make_optimizer

    start = time.perf_counter()
    devices = select_devices(cfg.devices or None)
    validate(cfg, len(devices))
    mesh = cfg.mesh or default_mesh(cfg.strategy, len(devices))
    if cfg.strategy not in STRATEGIES:  # a bad mesh fails before any data is read
        make_mesh(mesh, devices)
    show = cfg.progress and jax.process_index() == 0
    splits = {split: data.load_split("mnist", split, cfg.data_dir, download=cfg.download,
                                     progress=show, fallbacks=DATA_FALLBACKS)
              for split in ("train", "test")}
    augment = make_augment(cfg.augment)
    train_data = data.from_arrays(
        (splits["train"].images, splits["train"].labels), global_batch=cfg.global_batch,
        seed=cfg.seed, name="mnist/train",
        augment=(lambda ex, rng: (augment(ex[0], rng), ex[1])) if augment else None)
    test_data = data.from_arrays((splits["test"].images, splits["test"].labels),
                                 global_batch=cfg.eval_batch, name="mnist/test")
    ends = epoch_end_steps(len(train_data), cfg.global_batch, cfg.epochs)
    total_steps = min(ends[-1], cfg.max_steps) if cfg.max_steps else ends[-1]
    tx = make_optimizer(cfg.optimizer, total_steps)
    if cfg.staleness:
        import optax

        from jaxdist.comm import stale_gradients

        tx = optax.chain(stale_gradients(cfg.staleness), tx)
    model_name, _ = model_builder(cfg)
    trainer = make_trainer(cfg, devices, tx)
    if jax.process_index() == 0:
        layout = f" over mesh {mesh}" if cfg.strategy not in STRATEGIES else ""
        print(f"training the MNIST {model_name} on {len(devices)} {devices[0].platform} device(s), "
              f"strategy {cfg.strategy}{layout}, global batch {cfg.global_batch}, {total_steps} "
              f"steps, {cfg.optimizer.name} lr {cfg.optimizer.learning_rate} "
              f"({cfg.optimizer.schedule})", flush=True)
    run = fit(
        trainer, train_data, epochs=cfg.epochs, steps=cfg.max_steps or None, eval_data=test_data,
        eval_examples=cfg.eval_examples or None, workdir=cfg.workdir,
        checkpoint_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, keep_best=cfg.keep_best,
        best_metric="test_accuracy", restore_step=cfg.restore_step,
        data_meta={"augment": cfg.augment}, nonfinite_limit=cfg.nonfinite_limit,
        progress=cfg.progress, progress_every=cfg.progress_every, logdir=log_dir(cfg),
        profile_steps=parse_step_range(cfg.profile_steps), hang_timeout=cfg.hang_timeout,
        peak_tflops=cfg.peak_tflops, run_meta={
            "model": cfg.model, "model_name": model_name, "mesh": cfg.mesh, "epochs": cfg.epochs,
            "grad_reduce": cfg.grad_reduce, "local_steps": cfg.local_steps,
            "optimizer": cfg.optimizer.name, "learning_rate": cfg.optimizer.learning_rate},
        log=print)
    if run.stopped:
        return {"stopped_at": run.stopped_at, "wall_seconds": time.perf_counter() - start,
                "workdir": cfg.workdir, "goodput": run.goodput}
    final = run.history[-1]
    return {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": run.train_seconds,
        "first_step_seconds": run.first_step_seconds,
        "images_per_second": run.images_per_second,
        "devices": len(devices),
        "platform": devices[0].platform,
        "strategy": cfg.strategy,
        "steps": total_steps,
        "history": run.history,
        "state": run.state,
        "dp": trainer,
        "goodput": run.goodput,
        "logdir": log_dir(cfg),
    }


def format_summary(s: dict) -> str:
    if "stopped_at" in s:
        where = f"; checkpoint in {s['workdir']}" if s.get("workdir") else ""
        return f"stopped at step {s['stopped_at']} after {s['wall_seconds']:.1f} s{where}"
    return (
        f"done: test accuracy {100 * s['test_accuracy']:.2f}% | wall {s['wall_seconds']:.1f} s "
        f"(first step {s['first_step_seconds']:.2f} s) | {s['images_per_second']:,.0f} img/s | "
        f"{s['devices']} {s['platform']} device(s) | strategy {s['strategy']} | {s['steps']} steps"
    )


def cluster_spec(cfg: MnistConfig) -> ClusterSpec:
    """The flags' part of how to join a multi-process job; the environment fills the rest."""
    return ClusterSpec(
        coordinator=cfg.coordinator,
        num_processes=cfg.num_processes or None,
        process_id=None if cfg.process_id < 0 else cfg.process_id,
        init_timeout=cfg.init_timeout or None,
        heartbeat_timeout=cfg.heartbeat_timeout or None,
    )


def main(argv: list[str] | None = None, configs=None, description: str | None = None) -> int:
    """Parses flags over `configs` (default: this module's `get_config`), trains, prints."""
    from jaxdist.comm import REDUCERS
    from jaxdist.config import parse_config
    from jaxdist.models import VIT_SIZES
    from jaxdist.parallel.rules import MODEL_PARALLEL_STRATEGIES

    cfg = parse_config(
        configs or get_config,
        argv,
        description=description or __doc__.split("\n\n")[0],
        choices={"strategy": STRATEGIES + MODEL_PARALLEL_STRATEGIES, "model": MODELS,
                 "augment": ("none", "shift"), "grad_reduce": REDUCERS,
                 "outer_optimizer": ("none", "nesterov"),
                 "compute_dtype": ("float32", "bfloat16"),
                 "vit_size": tuple(VIT_SIZES), "optimizer": OPTIMIZERS, "schedule": SCHEDULES},
        help_text=HELP,
    )
    try:
        configure_cpu_devices(cfg.cpu_devices or None)
        if cfg.compile_cache != "off":
            enable_compilation_cache(cfg.compile_cache)
        initialize(cluster_spec(cfg))  # joins a multi-process job when there is one
        summary = train(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax

    if jax.process_index() == 0:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
