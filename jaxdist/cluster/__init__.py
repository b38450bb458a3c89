"""Devices, processes and the distributed runtime."""

from jaxdist.cluster.compile_cache import enable_compilation_cache
from jaxdist.cluster.devices import configure_cpu_devices, select_devices
from jaxdist.cluster.distributed import ClusterSpec, initialize

__all__ = [
    "ClusterSpec",
    "configure_cpu_devices",
    "enable_compilation_cache",
    "initialize",
    "select_devices",
]
