"""Where a measurement ran: every benchmark prints this with its table, because ratios measured
on one machine do not carry over to another."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(**versions: str) -> str:
    """One line: CPU model, cores, Python, jax (and any `versions` given, e.g. torch=...), the
    accelerator when there is one, and the UTC date and time."""
    import jax

    parts = [cpu_model(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"jax {jax.__version__}", *(f"{name} {v}" for name, v in versions.items())]
    backend = jax.default_backend()
    if backend != "cpu":
        parts.append(f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    parts.append(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return ", ".join(parts)
