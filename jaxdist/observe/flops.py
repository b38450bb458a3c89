"""FLOPs and MFU: FLOPs of the compiled step from XLA's `cost_analysis()` (per device: the
compiled module is one device's program) times steps per second, over a peak that is an
assumption (a flag, or a per-platform default printed as such) or measured
(`measure_matmul_peak`: what a dense matmul reaches here, a ceiling no datasheet promises)."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxdist.cluster.devices import XLA_OWN_CPU_KERNELS


def flops_per_step(compiled: Any, lowered: Any = None) -> float | None:
    """FLOPs of one run of a compiled step from `compiled.cost_analysis()` (a dict, or a list of
    dicts in older JAX: summed), or None when XLA gives none. For SPMD-partitioned, shard_map and
    pmap steps it is one device's program, i.e. FLOPs per device.

    XLA counts nothing inside oneDNN calls (on CPU, jaxdist's default for convolutions): given
    the `lowered` step, such a program is compiled once more with XLA's own kernels and counted.
    """
    if lowered is not None and "__onednn$" in compiled.as_text():
        compiled = lowered.compile(compiler_options=XLA_OWN_CPU_KERNELS)
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if analysis is None:
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    total = sum(float(a.get("flops", 0.0)) for a in analysis if a)
    return total if total > 0 else None


# dense bf16 (accelerators) peak TFLOP/s per chip; a CPU core is assumed to do 0.1 TFLOP/s (fp32
# FMAs on 512-bit vectors at ~3 GHz), shared by the virtual devices of the process
_GPU_PEAKS = (("B200", 2250.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
              ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0))
_TPU_PEAKS = (("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
              ("v3", 123.0), ("v2", 45.0))
CPU_CORE_TFLOPS = 0.1


def default_peak_tflops(device: Any = None) -> tuple[float, str]:
    """(assumed peak TFLOP/s per device, a sentence saying where it comes from)."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "gpu":
        for name, peak in _GPU_PEAKS:
            if name.lower() in kind.lower():
                return peak, f"{kind}: {peak:g} TFLOP/s dense bf16 (datasheet)"
        return 100.0, f"{kind}: unknown GPU, 100 TFLOP/s assumed"
    if device.platform == "tpu":
        for name, peak in _TPU_PEAKS:
            if name in kind.lower():
                return peak, f"{kind}: {peak:g} TFLOP/s bf16 (datasheet)"
        return 200.0, f"{kind}: unknown TPU, 200 TFLOP/s assumed"
    cores = os.cpu_count() or 1
    local = max(1, jax.local_device_count())
    peak = CPU_CORE_TFLOPS * cores / local
    return peak, (f"cpu: {CPU_CORE_TFLOPS:g} TFLOP/s per core x {cores} cores shared by "
                  f"{local} devices = {peak:.3g} TFLOP/s per device")


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, *, iters: int = 8,
                        repeats: int = 3, device: Any = None) -> float:
    """Dense FLOP/s of one device: the best of `repeats` timings of `iters` jitted (n, n) @ (n, n)
    products (2 n^3 FLOPs each) in `dtype`, after one untimed run (the compilation).

    `device` defaults to the first local device, so on an accelerator it is one chip's peak, the
    denominator of a per-device MFU. On CPU one device's matmul already runs on every core's
    threads (XLA's intra-op pool is the process's), so it is the whole process's peak; virtual
    CPU devices share it. Measured with the XLA flags in force (oneDNN's where jaxdist set them),
    i.e. the kernels a jaxdist step gets."""
    device = device or jax.local_devices()[0]
    a, b = (jax.device_put(jax.random.normal(key, (n, n), dtype), device)
            for key in jax.random.split(jax.random.key(0)))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / iters)
    return 2 * n**3 / best


def mfu(flops_per_device_step: float, steps_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s per device over the peak per device."""
    return flops_per_device_step * steps_per_second / (peak_tflops * 1e12)


def lowered_step(trainer: Any, state: Any, batch: Any) -> Any:
    """The lowered train step of a `Trainer` for these arguments."""
    lower = getattr(trainer, "lower", None) or trainer.backend.step.lower
    return lower(state, batch)


def compiled_step(trainer: Any, state: Any, batch: Any) -> Any:
    """The compiled train step of a `Trainer` for these arguments.

    After the first step has run this is a cache hit (milliseconds), not a second compilation.
    """
    return lowered_step(trainer, state, batch).compile()
