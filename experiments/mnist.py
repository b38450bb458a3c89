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
from typing import Literal

from jaxdist.errors import UsageError
# the registered image models' loss and evaluation, under their usual names for callers
from jaxdist.models.classification import mnist_eval as eval_fn  # noqa: F401
from jaxdist.models.classification import mnist_loss as loss_fn  # noqa: F401
from jaxdist.models.registry import ModelVariant, get_model, model_names
from jaxdist.train import CheckpointConfig, EvalConfig, run_config
from jaxdist.train.run_config import (
    RunConfig,
    check_best_metric,
    check_directory,
    eval_metric_names,
    run_main,
    trainer_options,
    with_staleness,
)

# where this repository's CI keeps prepared datasets, looked in after TFDS's own lookup
DATA_FALLBACKS = (Path(__file__).resolve().parent.parent.parent / "shared" / "data" /
                  "tensorflow_datasets",)


@dataclasses.dataclass(frozen=True)
class MnistConfig(RunConfig):
    """The shared run flags (`jaxdist.train.run_config`) and MNIST's model and data."""

    model: str = "cnn"
    """cnn (the classic CNN), wide_cnn, or vit"""
    vit_size: Literal["tiny", "small", "base", "large"] = "tiny"
    """ViT size"""
    augment: Literal["none", "shift"] = "none"
    """training-set augmentation: none, or shift (random shifts of up to 2 pixels)"""
    data_dir: str | None = None
    """TFDS data dir (default: $TFDS_DATA_DIR, then ~/tensorflow_datasets, then
    ../shared/data/tensorflow_datasets beside the repository)"""
    download: bool = False
    """download and prepare MNIST if missing (needs internet and jaxdist[prepare])"""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """CNN: float32, or bfloat16 compute with float32 master weights"""
    eval: EvalConfig = EvalConfig(batch=2000, prefix="test")
    checkpoint: CheckpointConfig = CheckpointConfig(keep_best=1, best_metric="test_accuracy")


def with_variant(cfg: MnistConfig, variant: str) -> MnistConfig:
    """`cfg` itself, or its 'smoke' variant: a few steps on a slice of the test set."""
    return run_config.with_variant(cfg, variant, dict(epochs=1, max_steps=8,
                                                      eval_examples=2000))


def get_config(variant: str = "") -> MnistConfig:
    """The default recipe, or a named variant (see `with_variant`)."""
    return with_variant(MnistConfig(), variant)


MODELS = model_names(task="image_classification")  # cnn, wide_cnn, vit: the registry's


def model_variant(cfg: MnistConfig) -> ModelVariant:
    """The registry's `cfg.model`, at `cfg.vit_size` where it has sizes, computing in
    `cfg.compute_dtype` (the CNN's option)."""
    spec = get_model(cfg.model)
    options = {} if cfg.compute_dtype == "float32" else {"compute_dtype": cfg.compute_dtype}
    return spec.variant(cfg.vit_size if spec.sizes else None, **options)


def model_builder(cfg: MnistConfig):
    """(name for messages, a function that builds the model from `cfg.seed`) of
    `model_variant(cfg)`."""
    variant = model_variant(cfg)
    return variant.title, variant.model_fn(cfg.seed)


def make_trainer(cfg: MnistConfig, devices, tx):
    """The `jaxdist.Trainer` of the configured model and strategy."""
    from jaxdist import Trainer

    model = model_variant(cfg)
    build = model.model_fn(cfg.seed)
    return Trainer(build() if _data_parallel(cfg) else build,  # model-parallel: born sharded
                   tx, model.loss_fn, devices=devices, eval_fn=model.eval_fn,
                   **trainer_options(cfg))


def validate(cfg: MnistConfig, num_devices: int) -> None:
    """The shared flags' checks, then MNIST's own, before any data is loaded."""
    cfg.validate(num_devices)
    if cfg.eval.batch < 1 or cfg.eval.batch % num_devices:
        raise UsageError(f"eval batch {cfg.eval.batch} does not divide over {num_devices} "
                         f"devices")
    if cfg.compute_dtype != "float32" and cfg.model != "cnn":
        raise UsageError("--compute_dtype is implemented for the CNN")
    check_directory("data_dir", cfg.data_dir)
    model = model_variant(cfg)
    check_best_metric(cfg, eval_metric_names(model.eval_fn, model.model_fn(cfg.seed),
                                             model.eval_batch(1), cfg.eval.prefix))


def _data_parallel(cfg: MnistConfig) -> bool:
    """Whether the strategy replicates the model (it is built whole, then placed)."""
    from jaxdist import STRATEGIES

    return STRATEGIES[cfg.parallel.strategy].parallelism == "data"


def train(cfg: MnistConfig) -> dict:
    """Runs the experiment and returns its summary (also printed by `main`)."""
    import jax

    from jaxdist import data, fit
    from jaxdist.cluster import select_devices
    from jaxdist.data.augment import make_augment
    from jaxdist import STRATEGIES, Schedule, make_mesh, make_optimizer

    start = time.perf_counter()
    devices = select_devices(cfg.parallel.devices or None)
    validate(cfg, len(devices))
    strategy = STRATEGIES[cfg.parallel.strategy]
    mesh = cfg.parallel.mesh or strategy.default_mesh(len(devices))
    if not _data_parallel(cfg):  # a bad mesh fails before any data is read
        make_mesh(mesh, devices)
    show = cfg.observe.progress and jax.process_index() == 0
    train_split, test_split = (data.load_split("mnist", split, cfg.data_dir, download=cfg.download,
                                               progress=show, fallbacks=DATA_FALLBACKS)
                               for split in ("train", "test"))
    augment = make_augment(cfg.augment)
    train_data = data.from_arrays(
        (train_split.images, train_split.labels), global_batch=cfg.global_batch, seed=cfg.seed,
        name="mnist/train", settings={"augment": cfg.augment},
        augment=(lambda ex, rng: (augment(ex[0], rng), ex[1])) if augment else None)
    test_data = data.from_arrays((test_split.images, test_split.labels),
                                 global_batch=cfg.eval.batch, name="mnist/test")
    total_steps = Schedule.of(train_data, epochs=cfg.epochs, steps=cfg.max_steps or None).total
    tx = with_staleness(cfg, make_optimizer(cfg.optimizer, total_steps))
    model_name, _ = model_builder(cfg)
    trainer = make_trainer(cfg, devices, tx)
    if jax.process_index() == 0:
        layout = f" over mesh {mesh}" if not _data_parallel(cfg) else ""
        print(f"training the MNIST {model_name} on {len(devices)} {devices[0].platform} device(s), "
              f"strategy {cfg.parallel.strategy}{layout}, global batch {cfg.global_batch}, {total_steps} "
              f"steps, {cfg.optimizer.name} lr {cfg.optimizer.learning_rate} "
              f"({cfg.optimizer.schedule})", flush=True)
    run = fit(trainer, train_data, eval_data=test_data, **cfg.fit_options(), meta={
        "model": cfg.model, "model_name": model_name, "mesh": cfg.parallel.mesh,
        "epochs": cfg.epochs, "grad_reduce": cfg.parallel.grad_reduce,
        "local_steps": cfg.parallel.local_steps, "optimizer": cfg.optimizer.name,
        "learning_rate": cfg.optimizer.learning_rate})
    summary = {"wall_seconds": time.perf_counter() - start, "goodput": run.goodput,
               "workdir": cfg.checkpoint.workdir, "logdir": cfg.logdir}
    if run.stopped:
        return {**summary, "stopped_at": run.stopped_at}
    final = run.history[-1]
    return {**summary, "test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"],
            "train_seconds": run.train_seconds, "first_step_seconds": run.first_step_seconds,
            "images_per_second": run.images_per_second, "devices": len(devices),
            "platform": devices[0].platform, "strategy": cfg.parallel.strategy, "steps": total_steps,
            "history": run.history, "state": run.state, "dp": trainer}


def format_summary(s: dict) -> str:
    if "stopped_at" in s:
        where = f"; checkpoint in {s['workdir']}" if s.get("workdir") else ""
        return f"stopped at step {s['stopped_at']} after {s['wall_seconds']:.1f} s{where}"
    return (
        f"done: test accuracy {100 * s['test_accuracy']:.2f}% | wall {s['wall_seconds']:.1f} s "
        f"(first step {s['first_step_seconds']:.2f} s) | {s['images_per_second']:,.0f} img/s | "
        f"{s['devices']} {s['platform']} device(s) | strategy {s['strategy']} | {s['steps']} steps"
    )


def main(argv: list[str] | None = None, configs=None, description: str | None = None) -> int:
    """Parses flags over `configs` (default: this module's `get_config`), trains, prints."""
    return run_main(argv, configs or get_config, description=description or
                    __doc__.split("\n\n")[0], train=train, summary=format_summary,
                    choices={"model": MODELS})


if __name__ == "__main__":
    sys.exit(main())
