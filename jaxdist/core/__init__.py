"""What every layer builds on: the train state, the one pure train step, mesh axis names, the
layout hooks a model calls, and the `Callback` protocol of the loop. Layers import the modules;
the package names what a model author or a user meets."""

from jaxdist.core.callback import Callback
from jaxdist.core.step import TrainState

__all__ = ["Callback", "TrainState"]
