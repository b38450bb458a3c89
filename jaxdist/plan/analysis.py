"""What one ahead-of-time compile of a train step says per device: memory, collectives, FLOPs
(shared with benchmarks/parallel.py and experiments/lm.py)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from jaxdist.cluster.devices import XLA_OWN_CPU_KERNELS

# Options for the planning compiles only: they lower LLVM's effort when generating CPU code,
# which roughly halves compile time; XLA's HLO passes, buffer assignment (hence
# memory_analysis), cost analysis and the partitioned HLO are the same (the tests compare against
# a default compile).
# XLA's own kernels too: oneDNN's (jaxdist's CPU default) hide their FLOPs from the cost analysis.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                **XLA_OWN_CPU_KERNELS}


@dataclasses.dataclass
class StepAnalysis:
    """What one ahead-of-time compile of a train step says, per device and per step."""

    memory: Any  # jaxdist.observe.MemoryReport
    ledger: Any  # jaxdist.observe.Ledger
    flops: float
    compile_s: float
    hlo: str = ""  # the compiled step's partitioned HLO (`compiled.as_text()`)


def flops_per_device(compiled: Any, lowered: Any = None) -> float:
    """FLOPs of one run of `compiled` on one device (the partitioned program), from XLA's cost
    analysis (`jaxdist.observe.flops.flops_per_step`, which needs `lowered` to count oneDNN
    calls); 0 where the backend gives none."""
    from jaxdist.observe.flops import flops_per_step

    return flops_per_step(compiled, lowered) or 0.0


def abstract_batch(trainer: Any, batch: Any) -> Any:
    """ShapeDtypeStructs of `batch` (arrays or shapes of the global batch) laid out like the
    trainer's batch."""
    import jax

    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.batch_sharding), batch)


def analyze_step(trainer: Any, batch: Any, compiler_options: dict | None = None
                 ) -> StepAnalysis:
    """Compiles `trainer`'s step for its abstract state and `batch` (arrays or ShapeDtypeStructs
    of the global batch) and reads memory, collectives and FLOPs per device. Nothing is
    allocated. `compiler_options` default: `FAST_COMPILE` on CPU meshes, XLA's defaults
    elsewhere."""
    from jaxdist.observe import collective_ledger, memory_report

    if compiler_options is None and trainer.mesh.devices.flat[0].platform == "cpu":
        compiler_options = FAST_COMPILE
    state = trainer.abstract_state()
    start = time.perf_counter()
    lowered = trainer.lower(state, abstract_batch(trainer, batch))
    compiled = lowered.compile(compiler_options)
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    return StepAnalysis(memory=memory_report(compiled, state, trainer.grad_shardings),
                        ledger=collective_ledger(hlo, trainer.num_devices),
                        flops=flops_per_device(compiled, lowered), compile_s=seconds, hlo=hlo)

