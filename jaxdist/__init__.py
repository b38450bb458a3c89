"""jaxdist: train JAX/Flax models across many devices and hosts."""

from jaxdist.cluster import configure_cpu_devices, select_devices
from jaxdist.errors import UsageError
from jaxdist.parallel import STRATEGIES, DataParallel, Rules, ShardedTrainer, Trainer, make_mesh
from jaxdist import data
from jaxdist.train import Callback, OptimizerConfig, TrainState, fit, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "data",
    "fit",
    "STRATEGIES",
    "DataParallel",
    "Rules",
    "ShardedTrainer",
    "Trainer",
    "make_mesh",
    "OptimizerConfig",
    "TrainState",
    "UsageError",
    "configure_cpu_devices",
    "make_optimizer",
    "select_devices",
]
