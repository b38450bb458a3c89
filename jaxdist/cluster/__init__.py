"""Devices, processes and the distributed runtime."""

from jaxdist.cluster.compile_cache import enable_compilation_cache
from jaxdist.cluster.distributed import ClusterSpec, initialize
from jaxdist.cluster.devices import (
    DEFAULT_CPU_DEVICES,
    ONEDNN_XLA_FLAGS,
    XLA_OWN_CPU_KERNELS,
    configure_cpu_devices,
    select_devices,
    use_onednn_convolutions,
)

__all__ = [
    "ClusterSpec",
    "DEFAULT_CPU_DEVICES",
    "ONEDNN_XLA_FLAGS",
    "XLA_OWN_CPU_KERNELS",
    "configure_cpu_devices",
    "enable_compilation_cache",
    "initialize",
    "select_devices",
    "use_onednn_convolutions",
]
