"""jaxdist: train JAX/Flax models across many devices and hosts."""

from jaxdist.cluster import configure_cpu_devices, select_devices
from jaxdist.errors import UsageError
from jaxdist.parallel import STRATEGIES, DataParallel
from jaxdist.train import OptimizerConfig, TrainState, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "DataParallel",
    "OptimizerConfig",
    "TrainState",
    "UsageError",
    "configure_cpu_devices",
    "make_optimizer",
    "select_devices",
]
