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

from jaxdist.errors import UsageError
from jaxdist.models.classification import mnist_eval as eval_fn  # noqa: F401 - usual names
from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist.models.registry import get_model, model_names
from jaxdist.parallel.strategies import DATA_PARALLEL_STRATEGIES as STRATEGIES
from jaxdist.train import run_config
from jaxdist.train.run_config import (
    RunConfig,
    check_best_metric,
    check_directory,
    eval_metric_names,
    fit_options,
    log_dir,
    run_main,
    trainer_options,
    validate_run,
    with_staleness,
)

# where this repository's CI keeps prepared datasets, looked in after TFDS's own lookup
DATA_FALLBACKS = (Path(__file__).resolve().parent.parent.parent / "shared" / "data" /
                  "tensorflow_datasets",)


@dataclasses.dataclass(frozen=True)
class MnistConfig(RunConfig):
    """The shared run flags (`jaxdist.train.run_config`) and MNIST's model and data."""

    model: str = "cnn"
    vit_size: str = "tiny"
    augment: str = "none"
    data_dir: str | None = None
    download: bool = False
    compute_dtype: str = "float32"
    eval_batch: int = 2000
    eval_examples: int = 0



HELP = {
    "model": "cnn (the classic CNN), wide_cnn, or vit",
    "vit_size": "ViT size (tiny, small, base, large)",
    "augment": "training-set augmentation: none, or shift (random shifts of up to 2 pixels)",
    "data_dir": "TFDS data dir (default: $TFDS_DATA_DIR, then ~/tensorflow_datasets, then "
                "../shared/data/tensorflow_datasets beside the repository)",
    "download": "download and prepare MNIST if missing (needs internet and jaxdist[prepare])",
    "compute_dtype": "CNN: float32, or bfloat16 compute with float32 master weights",
    "eval_batch": "examples per evaluation batch",
    "eval_examples": "evaluate on the first N test examples (0: all)",
}


def with_variant(cfg: MnistConfig, variant: str) -> MnistConfig:
    """`cfg` itself, or its 'smoke' variant: a few steps on a slice of the test set."""
    return run_config.with_variant(cfg, variant, dict(epochs=1, max_steps=8,
                                                      eval_examples=2000))


def get_config(variant: str = "") -> MnistConfig:
    """The default recipe, or a named variant (see `with_variant`)."""
    return with_variant(MnistConfig(), variant)


MODELS = model_names(task="image_classification")  # cnn, wide_cnn, vit: the registry's


def model_builder(cfg: MnistConfig):
    """(name for messages, a function that builds the model): the registry's `cfg.model`, at
    `cfg.vit_size` where it has sizes, computing in `cfg.compute_dtype` (the CNN's option)."""
    spec = get_model(cfg.model)
    options = {} if cfg.compute_dtype == "float32" else {"compute_dtype": cfg.compute_dtype}
    variant = spec.variant(cfg.vit_size if spec.sizes else None, **options)
    return variant.title, variant.model_fn(cfg.seed)


def make_trainer(cfg: MnistConfig, devices, tx):
    """The `jaxdist.Trainer` of the configured model and strategy."""
    from jaxdist import Trainer

    _, build = model_builder(cfg)
    model = build() if cfg.strategy in STRATEGIES else build  # model-parallel: born sharded
    return Trainer(model, tx, loss_fn, devices=devices, eval_fn=eval_fn, **trainer_options(cfg))


def validate(cfg: MnistConfig, num_devices: int) -> None:
    """The shared flags' checks, then MNIST's own, before any data is loaded."""
    validate_run(cfg, num_devices)
    if cfg.eval_batch < 1 or cfg.eval_batch % num_devices:
        raise UsageError(f"eval batch {cfg.eval_batch} does not divide over {num_devices} devices")
    if cfg.compute_dtype != "float32" and cfg.model != "cnn":
        raise UsageError("--compute_dtype is implemented for the CNN")
    if cfg.eval_examples < 0:
        raise UsageError(f"eval_examples must be >= 0 (0: all), got {cfg.eval_examples}")
    check_directory("data_dir", cfg.data_dir)
    check_best_metric(cfg, eval_metric_names(eval_fn, model_builder(cfg)[1], _eval_batch(),
                                             EVAL_PREFIX))


EVAL_PREFIX = "test"  # fit names the metrics test_accuracy, test_loss


def _eval_batch():
    """Shapes of one evaluation batch: images, labels and the padding mask."""
    import jax
    import numpy as np

    return (jax.ShapeDtypeStruct((1, 28, 28, 1), np.uint8),
            jax.ShapeDtypeStruct((1,), np.int32), jax.ShapeDtypeStruct((1,), np.float32))


def train(cfg: MnistConfig) -> dict:
    """Runs the experiment and returns its summary (also printed by `main`)."""
    import jax

    from jaxdist import data, fit
    from jaxdist.cluster import select_devices
    from jaxdist.data.augment import make_augment
    from jaxdist.parallel import default_mesh, make_mesh
    from jaxdist.train import epoch_end_steps, make_optimizer

    start = time.perf_counter()
    devices = select_devices(cfg.devices or None)
    validate(cfg, len(devices))
    mesh = cfg.mesh or default_mesh(cfg.strategy, len(devices))
    if cfg.strategy not in STRATEGIES:  # a bad mesh fails before any data is read
        make_mesh(mesh, devices)
    show = cfg.progress and jax.process_index() == 0
    train_split, test_split = (data.load_split("mnist", split, cfg.data_dir, download=cfg.download,
                                               progress=show, fallbacks=DATA_FALLBACKS)
                               for split in ("train", "test"))
    augment = make_augment(cfg.augment)
    train_data = data.from_arrays(
        (train_split.images, train_split.labels), global_batch=cfg.global_batch, seed=cfg.seed,
        name="mnist/train",
        augment=(lambda ex, rng: (augment(ex[0], rng), ex[1])) if augment else None)
    test_data = data.from_arrays((test_split.images, test_split.labels),
                                 global_batch=cfg.eval_batch, name="mnist/test")
    ends = epoch_end_steps(len(train_data), cfg.global_batch, cfg.epochs)
    total_steps = min(ends[-1], cfg.max_steps) if cfg.max_steps else ends[-1]
    tx = with_staleness(cfg, make_optimizer(cfg.optimizer, total_steps))
    model_name, _ = model_builder(cfg)
    trainer = make_trainer(cfg, devices, tx)
    if jax.process_index() == 0:
        layout = f" over mesh {mesh}" if cfg.strategy not in STRATEGIES else ""
        print(f"training the MNIST {model_name} on {len(devices)} {devices[0].platform} device(s), "
              f"strategy {cfg.strategy}{layout}, global batch {cfg.global_batch}, {total_steps} "
              f"steps, {cfg.optimizer.name} lr {cfg.optimizer.learning_rate} "
              f"({cfg.optimizer.schedule})", flush=True)
    run = fit(trainer, train_data, eval_data=test_data, eval_prefix=EVAL_PREFIX,
              eval_examples=cfg.eval_examples or None,
              data_meta={"augment": cfg.augment}, **fit_options(cfg), run_meta={
                  "model": cfg.model, "model_name": model_name, "mesh": cfg.mesh,
                  "epochs": cfg.epochs, "grad_reduce": cfg.grad_reduce,
                  "local_steps": cfg.local_steps, "optimizer": cfg.optimizer.name,
                  "learning_rate": cfg.optimizer.learning_rate})
    summary = {"wall_seconds": time.perf_counter() - start, "goodput": run.goodput,
               "workdir": cfg.workdir, "logdir": log_dir(cfg)}
    if run.stopped:
        return {**summary, "stopped_at": run.stopped_at}
    final = run.history[-1]
    return {**summary, "test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"],
            "train_seconds": run.train_seconds, "first_step_seconds": run.first_step_seconds,
            "images_per_second": run.images_per_second, "devices": len(devices),
            "platform": devices[0].platform, "strategy": cfg.strategy, "steps": total_steps,
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
    from jaxdist.models import VIT_SIZES

    return run_main(argv, configs or get_config, description=description or
                    __doc__.split("\n\n")[0], train=train, summary=format_summary, choices={
                        "model": MODELS, "augment": ("none", "shift"),
                        "compute_dtype": ("float32", "bfloat16"), "vit_size": tuple(VIT_SIZES)},
                    help_text=HELP)


if __name__ == "__main__":
    sys.exit(main())
