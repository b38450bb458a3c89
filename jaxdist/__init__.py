"""jaxdist: train JAX/Flax models across many devices and hosts.

Every public name is listed here, in one place; the modules behind them are implementation.
Subpackages (`jaxdist.data`, `jaxdist.models`, `jaxdist.observe`, `jaxdist.io`,
`jaxdist.cluster`, `jaxdist.comm`, `jaxdist.plan`) hold the rest of what a user imports.
"""

from jaxdist import data
from jaxdist.cluster import configure_cpu_devices, select_devices
from jaxdist.core.callback import Callback
from jaxdist.core.step import TrainState
from jaxdist.errors import TransientError, UsageError
from jaxdist.observe.monitor import ObserveConfig
from jaxdist.parallel import (
    STRATEGIES,
    Jit,
    LocalSGD,
    Pipeline,
    Pmap,
    Rules,
    ShardMap,
    Trainer,
    make_mesh,
)
from jaxdist.train import (
    CheckpointConfig,
    EvalConfig,
    GuardConfig,
    OptimizerConfig,
    Run,
    Schedule,
    TrainingDiverged,
    fit,
    make_optimizer,
    training_steps,
)

__version__ = "0.1.0"

__all__ = [
    # a model, an optimizer and a loss become one step under a strategy
    "Trainer",
    "TrainState",
    "STRATEGIES",
    "Jit",
    "ShardMap",
    "Pmap",
    "LocalSGD",
    "Rules",
    "Pipeline",
    "make_mesh",
    # the loop and its services
    "fit",
    "Run",
    "Schedule",
    "training_steps",
    "Callback",
    "CheckpointConfig",
    "EvalConfig",
    "GuardConfig",
    "ObserveConfig",
    # optimizers and data
    "OptimizerConfig",
    "make_optimizer",
    "data",
    # devices and errors
    "configure_cpu_devices",
    "select_devices",
    "UsageError",
    "TransientError",
    "TrainingDiverged",
]
