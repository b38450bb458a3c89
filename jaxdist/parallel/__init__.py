"""Meshes, sharding rules, and the data- and model-parallel trainers."""

from jaxdist.parallel.backends import STRATEGIES, Backend, make_backend, pmean_floats
from jaxdist.parallel.data_parallel import DataParallel, ShardedTrainer
from jaxdist.parallel.mesh import (
    DATA_AXIS,
    MESH_AXES,
    batch_sharded,
    data_mesh,
    make_mesh,
    parse_mesh_shape,
    replicated,
)
from jaxdist.parallel.rules import (
    LOGICAL_AXES,
    MODEL_PARALLEL_STRATEGIES,
    STRATEGY_RULES,
    Rules,
    rules_for,
)
from jaxdist.parallel.strategies import (
    DATA_PARALLEL_STRATEGIES,
    STRATEGIES_TABLE,
    STRATEGY_NAMES,
    default_mesh,
)
from jaxdist.parallel.trainer import Trainer

__all__ = [
    "DATA_AXIS",
    "LOGICAL_AXES",
    "MESH_AXES",
    "MODEL_PARALLEL_STRATEGIES",
    "STRATEGIES",
    "STRATEGY_RULES",
    "STRATEGIES_TABLE",
    "STRATEGY_NAMES",
    "DATA_PARALLEL_STRATEGIES",
    "Trainer",
    "default_mesh",
    "Backend",
    "DataParallel",
    "Rules",
    "ShardedTrainer",
    "batch_sharded",
    "data_mesh",
    "make_backend",
    "make_mesh",
    "parse_mesh_shape",
    "pmean_floats",
    "replicated",
    "rules_for",
]
