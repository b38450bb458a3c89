"""The step-time model: FLOPs and collective bytes to seconds, under stated `Assumptions`."""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 2**30
MIB = 2**20

DEFAULT_BANDWIDTH_GBPS = 100.0
DEFAULT_LATENCY_US = 5.0
DEFAULT_PEAK_TFLOPS = 100.0


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """The stated model that turns FLOPs and collective bytes into time."""

    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    latency_us: float = DEFAULT_LATENCY_US
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    devices_per_link: int = 1
    """devices whose traffic shares one link of `bandwidth_gbps` (1: each device has its own;
    n: one link carries all n devices' bytes, e.g. processes behind one NIC or one loopback)"""

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    def describe(self, *, xla_flops: bool = True, model_flops: bool = False,
                 pipelines: bool = False) -> list[str]:
        """The printed assumptions: `xla_flops` / `model_flops` where the compute of some rows
        comes from XLA's cost analysis (the ViT) / the model's own FLOPs (the LM); `pipelines`
        where some rows are pipelined."""
        peak = (f"{self.peak_tflops:g} TFLOP/s (--peak_tflops: a stated peak, not measured; "
                f"no utilisation discount)")
        lines = ["Assumptions (a model, not a measurement):"]
        if xla_flops:
            lines.append(f"- compute = FLOPs per device (XLA cost analysis of the compiled step) "
                         f"/ {peak}")
        if model_flops:
            lines.append(
                f"- compute{' (LM)' if xla_flops else ''} = the model's training FLOPs per step "
                f"(6 N + 12 L T E per token, jaxdist.models.lm.flops_per_token, plus the forward "
                f"that the remat policy computes again) / n devices / {peak}; "
                f"not XLA's cost analysis, which counts the layer scan's body once")
        if pipelines:
            lines.append("- pipeline rows (pipeline=S, M microbatches, schedule gpipe, 1f1b or "
                         "interleaved with V=2 chunks per device): compute / (1 - bubble), "
                         "bubble = (S-1)/(M+S-1) for gpipe and 1f1b (the same forwards and "
                         "backwards, in another order), (S-1)/(V M+S-1) for interleaved, and "
                         "the compute column includes it; memory is per device, i.e. per "
                         "stage, from the compile of that schedule")
        return lines + [
            f"- communication = per collective in the step's HLO, alpha-beta over a ring: "
            f"{self.latency_us:g} us (--latency_us) x ring steps (all-reduce 2(g-1), all-gather/"
            f"reduce-scatter/all-to-all g-1, permute 1, g = group size) + ring wire bytes / "
            f"{self.bandwidth_gbps:g} Gbit/s = {self.bytes_per_second / 1e9:g} GB/s per device "
            f"(--bandwidth_gbps)"
            + (f", one link shared by {self.devices_per_link} devices: their bytes add up on it"
               if self.devices_per_link > 1 else ""),
            "- step = compute + communication: no overlap assumed (real steps overlap some "
            "communication with compute, so this leans pessimistic)",
            "- memory = XLA:CPU buffer assignment of the step compiled for n virtual CPU devices: "
            "peak = arguments + temp + outputs - donated; fits when peak <= budget; grads live "
            "inside temp",
            "- XLA:CPU has no native reduce-scatter (it all-reduces then slices), so gradient "
            "reduce-scatters are counted as all-reduces (2x their ring bytes); GPU/TPU compilers "
            "fuse and schedule differently",
        ]


def ring_steps(kind: str, n: int) -> int:
    """Latency-bound steps of a ring collective over a group of `n`."""
    if n <= 1:
        return 0
    if kind == "all-reduce":
        return 2 * (n - 1)
    if kind == "collective-permute":
        return 1
    return n - 1


def comm_seconds(ledger: Any, assumptions: Assumptions) -> float:
    """Alpha-beta time of every collective of a step, one after another."""
    total = 0.0
    for c in ledger.collectives:
        total += c.count * ring_steps(c.kind, c.group_size) * assumptions.latency_us * 1e-6
        total += c.wire_bytes * assumptions.devices_per_link / assumptions.bytes_per_second
    return total


def compute_seconds(flops: float, assumptions: Assumptions) -> float:
    return flops / (assumptions.peak_tflops * 1e12)
