"""The train step, optimizers and loop."""

from jaxdist.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig, make_optimizer, make_schedule
from jaxdist.train.step import TrainState, init_state, make_eval_step, make_train_step

__all__ = [
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
