"""Devices, processes and the distributed runtime."""

from jaxdist.cluster.devices import (
    DEFAULT_CPU_DEVICES,
    configure_cpu_devices,
    select_devices,
)

__all__ = ["DEFAULT_CPU_DEVICES", "configure_cpu_devices", "select_devices"]
