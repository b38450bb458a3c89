"""Where a measurement ran: every benchmark prints this with its table, because ratios measured
on one machine do not carry over to another. Also the CPU's theoretical peak FLOP/s where its
flags and clock tell it, the ceiling a measured one (`jaxdist.observe.flops.measure_matmul_peak`)
is read against."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable

CPUINFO = Path("/proc/cpuinfo")
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


def _processors(cpuinfo: str | None = None) -> list[dict[str, str]]:
    """/proc/cpuinfo's blocks, one per hardware thread, as {field: value}; [] without one."""
    text = (CPUINFO.read_text(errors="replace") if CPUINFO.exists() else "") \
        if cpuinfo is None else cpuinfo
    blocks = [[line.partition(":") for line in block.splitlines()]
              for block in text.strip().split("\n\n") if block.strip()]
    return [{key.strip(): value.strip() for key, _, value in block} for block in blocks]


def _first(field: str) -> str | None:
    """A field of the first hardware thread's /proc/cpuinfo block."""
    processors = _processors()
    return processors[0].get(field) if processors else None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    return _first("model name") or platform.processor() or platform.machine()


def physical_cores(cpuinfo: str | None = None) -> int:
    """Cores, not hardware threads (two threads of a core share its vector units): the distinct
    (physical id, core id) pairs of /proc/cpuinfo, else `os.cpu_count()`."""
    pairs = {(p.get("physical id"), p["core id"]) for p in _processors(cpuinfo) if "core id" in p}
    return len(pairs) or os.cpu_count() or 1


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's share), at most the
    physical cores."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return min(physical_cores(), allowed or physical_cores())


def cpu_clock_ghz() -> tuple[float, str] | None:
    """(the highest clock a core reports in GHz, where it was read), None where unknown: cpufreq's
    maximum, else lscpu's "CPU max MHz", else /proc/cpuinfo's "cpu MHz" (in a VM often the
    nominal clock, which turbo can exceed)."""
    if CPUFREQ_MAX.exists():
        return int(CPUFREQ_MAX.read_text()) / 1e6, "cpufreq max"
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.M)
        if found and float(found.group(1)) > 0:
            return float(found.group(1)) / 1e3, "lscpu max"
    mhz = _first("cpu MHz")
    return (float(mhz) / 1e3, "/proc/cpuinfo cpu MHz") if mhz else None


def vector_flops_per_cycle(flags: Iterable[str], vendor: str,
                           dtype: str = "float32") -> tuple[int, str] | None:
    """(dense matmul FLOPs one core can issue per cycle, how), from its vector flags; None for a
    dtype or CPU this does not know. The number of FMA units is not in the flags, so it is
    assumed: two 512-bit units on Intel AVX-512 (Xeon Gold, Platinum; some Silver have one),
    512-bit work on two 256-bit units on AMD's (Zen 4), two 256-bit units with AVX2 + FMA.
    bfloat16: AMX tiles (`amx_bf16`) do 1,024 FLOPs per cycle per core (Intel's TMUL: a 16x32
    by 32x16 bf16 tile product every 16 cycles), which oneDNN's matmuls use (measured here: 1.9
    TFLOP/s on 2 cores, against 0.3 in float32); else AVX512_BF16's dot products do twice
    float32's FLOPs, and without either it computes at float32's rate at best."""
    flags = set(flags)
    if "avx512f" in flags:
        units, lanes, name = (1, 16, "AMD AVX-512, 512 bits on 2x256-bit FMA") \
            if vendor == "AuthenticAMD" else (2, 16, "AVX-512, 2 FMA units assumed")
    elif {"avx2", "fma"} <= flags:
        units, lanes, name = 2, 8, "AVX2, 2 FMA units assumed"
    else:
        return None
    fp32 = units * lanes * 2  # a fused multiply-add is 2 FLOPs per lane
    if dtype == "float32":
        return fp32, f"{fp32} fp32 FLOP/cycle ({name})"
    if dtype == "bfloat16":
        if "amx_bf16" in flags:
            return 1024, "1024 bf16 FLOP/cycle (AMX tiles)"
        if "avx512_bf16" in flags:
            return 2 * fp32, f"{2 * fp32} bf16 FLOP/cycle ({name}, AVX512_BF16 dot products)"
        return fp32, f"{fp32} bf16 FLOP/cycle (no AVX512_BF16: at most float32's rate; {name})"
    return None


def theoretical_peak_flops(dtype: str = "float32") -> tuple[float | None, str]:
    """(the CPU's peak dense FLOP/s: cores x GHz x FLOPs per cycle, or None where the clock or the
    vector units are unknown; a sentence saying how it was worked out)."""
    flags = (_first("flags") or "").split()
    per_cycle = vector_flops_per_cycle(flags, _first("vendor_id") or "", dtype)
    clock = cpu_clock_ghz()
    if per_cycle is None or clock is None:
        missing = "clock" if clock is None else f"{dtype} FLOPs per cycle"
        return None, f"theoretical {dtype} peak unknown (no {missing})"
    cores, (ghz, source) = usable_cores(), clock
    peak = cores * ghz * 1e9 * per_cycle[0]
    return peak, (f"{cores} cores x {ghz:.2f} GHz ({source}) x {per_cycle[1]} = "
                  f"{peak / 1e9:,.0f} GFLOP/s")


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
