"""Devices, processes and the distributed runtime."""

from jaxdist.cluster.distributed import ClusterSpec, initialize
from jaxdist.cluster.devices import (
    DEFAULT_CPU_DEVICES,
    configure_cpu_devices,
    select_devices,
)

__all__ = ["ClusterSpec", "initialize", "DEFAULT_CPU_DEVICES", "configure_cpu_devices", "select_devices"]
