"""Train the wide CNN (1.26M parameters) on MNIST with FSDP over all devices.

    python -m experiments.wide_cnn                            # fsdp over 8 devices
    python -m experiments.wide_cnn --strategy zero1 --mesh data=8
    python -m experiments.wide_cnn --config smoke             # a few steps, for CI

Every flag of `experiments.mnist` applies (checkpoints, resume, preemption, multi-process).
"""

from __future__ import annotations

import sys

from experiments import mnist
from jaxdist.config import replace_flags


def get_config(variant: str = "") -> mnist.MnistConfig:
    """The wide-CNN recipe (the CNN's optimizer, 4 epochs), or 'smoke' (a few steps)."""
    cfg = replace_flags(mnist.MnistConfig(), model="wide_cnn", strategy="fsdp", epochs=4)
    return mnist.with_variant(cfg, variant)


def main(argv: list[str] | None = None) -> int:
    return mnist.main(argv, configs=get_config, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
