"""What every layer builds on: the train state, the one pure train step, mesh axis names."""

from jaxdist.core.axes import DATA_AXIS, MESH_AXES
from jaxdist.core.step import TrainState, init_state, make_eval_step, make_train_step

__all__ = ["DATA_AXIS", "MESH_AXES", "TrainState", "init_state", "make_eval_step",
           "make_train_step"]
