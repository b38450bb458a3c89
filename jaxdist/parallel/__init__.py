"""Meshes, shardings and the data-parallel strategies."""

from jaxdist.parallel.backends import STRATEGIES, Backend, make_backend, pmean_floats
from jaxdist.parallel.data_parallel import DataParallel
from jaxdist.parallel.mesh import DATA_AXIS, batch_sharded, data_mesh, replicated

__all__ = [
    "DATA_AXIS",
    "STRATEGIES",
    "Backend",
    "DataParallel",
    "batch_sharded",
    "data_mesh",
    "make_backend",
    "pmean_floats",
    "replicated",
]
