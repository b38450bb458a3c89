"""The training loop, its services (each a `Callback` with its own config) and optimizers."""

from jaxdist.core.callback import Callback
from jaxdist.observe.monitor import ObserveConfig, TrainMonitor
from jaxdist.train.checkpointing import CheckpointConfig, Checkpointing
from jaxdist.train.evaluation import EvalConfig, Evaluation
from jaxdist.train.fit import Run, fit
from jaxdist.train.guard import GuardConfig, NonFiniteGuard, TrainingDiverged
from jaxdist.train.loop import Schedule, StepInfo, training_steps
from jaxdist.train.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxdist.train.preemption import Preemption
from jaxdist.train.reporting import ProgressReport

__all__ = [
    "Callback",
    "CheckpointConfig",
    "Checkpointing",
    "EvalConfig",
    "Evaluation",
    "GuardConfig",
    "NonFiniteGuard",
    "ObserveConfig",
    "OptimizerConfig",
    "Preemption",
    "ProgressReport",
    "Run",
    "Schedule",
    "StepInfo",
    "TrainMonitor",
    "TrainingDiverged",
    "fit",
    "make_optimizer",
    "make_schedule",
    "training_steps",
]
