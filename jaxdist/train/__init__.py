"""The train step, optimizers and loop."""

from jaxdist.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig, make_optimizer, make_schedule
from jaxdist.core.step import TrainState, init_state, make_eval_step, make_train_step
from jaxdist.train.callbacks import Callback, Preemption
from jaxdist.train.fit import Run, fit
from jaxdist.train.loop import NonFiniteGuard, TrainingDiverged, epoch_end_steps, train_loop

__all__ = [
    "Callback",
    "NonFiniteGuard",
    "Preemption",
    "Run",
    "TrainingDiverged",
    "epoch_end_steps",
    "fit",
    "train_loop",
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimizerConfig",
    "TrainState",
    "init_state",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
]
