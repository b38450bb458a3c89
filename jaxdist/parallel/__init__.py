"""Strategies, meshes and sharding rules, and the one `Trainer` over all of them.

The internals (the backends of the mapped layouts, the rules layout, the pipeline, mesh helpers)
are imported from their modules by the code that needs them.
"""

from jaxdist.parallel.mesh import make_mesh
from jaxdist.parallel.rules import LOGICAL_AXES, Rules
from jaxdist.parallel.strategies import (
    STRATEGIES,
    Jit,
    LocalSGD,
    Pipeline,
    Pmap,
    ShardMap,
    Strategy,
    resolve,
)
from jaxdist.parallel.trainer import Trainer

__all__ = [
    "LOGICAL_AXES",
    "STRATEGIES",
    "Jit",
    "LocalSGD",
    "Pipeline",
    "Pmap",
    "Rules",
    "ShardMap",
    "Strategy",
    "Trainer",
    "make_mesh",
    "resolve",
]
