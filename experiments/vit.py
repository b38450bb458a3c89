"""Train a Vision Transformer on MNIST with FSDP + tensor parallelism over a 3-D mesh.

    python -m experiments.vit                                  # ViT-tiny, data=2,fsdp=2,tensor=2
    python -m experiments.vit --vit_size small --mesh fsdp=4,tensor=2
    python -m experiments.vit --config smoke                   # a few steps, for CI

Every flag of `experiments.mnist` applies (checkpoints, resume, preemption, multi-process).
"""

from __future__ import annotations

import sys

from experiments import mnist
from jaxdist.train.optim import OptimizerConfig
from jaxdist.train.run_config import ParallelConfig


def get_config(variant: str = "") -> mnist.MnistConfig:
    """The ViT recipe, or 'smoke' (a few steps)."""
    cfg = mnist.MnistConfig(
        model="vit", vit_size="tiny",
        parallel=ParallelConfig(strategy="fsdp_tp", mesh="data=2,fsdp=2,tensor=2"),
        global_batch=128, epochs=10, augment="shift",
        optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, schedule="warmup_cosine",
                                  warmup_fraction=0.05, weight_decay=0.05))
    return mnist.with_variant(cfg, variant)


def main(argv: list[str] | None = None) -> int:
    return mnist.main(argv, configs=get_config, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
