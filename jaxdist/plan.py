"""Pre-flight planner: memory, communication and step time per strategy and mesh, before any run.

    python -m jaxdist.plan --model vit --vit_size small,base,large --devices 8,16,32 \\
        --memory_gib 16 --bandwidth_gbps 100

For each model size, device count n, strategy and mesh it compiles the train step ahead of time
against a fake topology of n virtual CPU devices (no accelerator, nothing allocated: the state and
the batch are ShapeDtypeStructs), then reads

- memory per device from the compiled step's `memory_analysis()` (`jaxdist.observe.memory`),
- collective bytes per step per device from its partitioned HLO (`jaxdist.observe.ledger`),
- FLOPs per device from its `cost_analysis()`,

and turns them into an estimated step time with a stated model (`Assumptions`): compute = FLOPs /
peak, communication = alpha-beta per collective over a ring, no overlap. A config fits when its
peak bytes per device are within the budget; the recommended mesh for each n is the fastest that
fits. See docs/planning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from jaxdist.cluster.devices import XLA_OWN_CPU_KERNELS
from jaxdist.errors import UsageError
from jaxdist.parallel.rules import MODEL_PARALLEL_STRATEGIES

GIB = 2**30
MIB = 2**20

DEFAULT_MEMORY_GIB = 16.0
DEFAULT_BANDWIDTH_GBPS = 100.0
DEFAULT_LATENCY_US = 5.0
DEFAULT_PEAK_TFLOPS = 100.0
DEFAULT_GLOBAL_BATCH = 256

# Options for the planning compiles only: they lower LLVM's effort when generating CPU code,
# which roughly halves compile time; XLA's HLO passes, buffer assignment (hence
# memory_analysis), cost analysis and the partitioned HLO are the same (the tests compare against
# a default compile).
# XLA's own kernels too: oneDNN's (jaxdist's CPU default) hide their FLOPs from the cost analysis.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                **XLA_OWN_CPU_KERNELS}

STRATEGIES = MODEL_PARALLEL_STRATEGIES  # the model-parallel rows of the one strategy table


# ---------------------------------------------------------------------------------------------
# Analysis of one compiled step (shared with experiments/bench_parallel.py)


@dataclasses.dataclass
class StepAnalysis:
    """What one ahead-of-time compile of a train step says, per device and per step."""

    memory: Any  # jaxdist.observe.MemoryReport
    ledger: Any  # jaxdist.observe.Ledger
    flops: float
    compile_s: float


def flops_per_device(compiled: Any, lowered: Any = None) -> float:
    """FLOPs of one run of `compiled` on one device (the partitioned program), from XLA's cost
    analysis (`jaxdist.observe.metrics.flops_per_step`, which needs `lowered` to count oneDNN
    calls); 0 where the backend gives none."""
    from jaxdist.observe.metrics import flops_per_step

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
    return StepAnalysis(memory=memory_report(compiled, state, trainer.grad_shardings),
                        ledger=collective_ledger(compiled.as_text(), trainer.num_devices),
                        flops=flops_per_device(compiled, lowered), compile_s=seconds)


# ---------------------------------------------------------------------------------------------
# The step-time model


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """The stated model that turns FLOPs and collective bytes into time."""

    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    latency_us: float = DEFAULT_LATENCY_US
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    def describe(self) -> list[str]:
        return [
            "Assumptions (a model, not a measurement):",
            f"- compute = FLOPs per device (XLA cost analysis of the compiled step) / "
            f"{self.peak_tflops:g} TFLOP/s (--peak_tflops: a stated peak, not measured; "
            f"no utilisation discount)",
            f"- communication = per collective in the step's HLO, alpha-beta over a ring: "
            f"{self.latency_us:g} us (--latency_us) x ring steps (all-reduce 2(g-1), all-gather/"
            f"reduce-scatter/all-to-all g-1, permute 1, g = group size) + ring wire bytes / "
            f"{self.bandwidth_gbps:g} Gbit/s = {self.bytes_per_second / 1e9:g} GB/s per device "
            f"(--bandwidth_gbps)",
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
        total += c.wire_bytes / assumptions.bytes_per_second
    return total


def compute_seconds(flops: float, assumptions: Assumptions) -> float:
    return flops / (assumptions.peak_tflops * 1e12)


# ---------------------------------------------------------------------------------------------
# Models, meshes, configs


def model_spec(model: str, size: str, overrides: dict | None = None
               ) -> tuple[Callable[[], Any], tuple[int, ...], str]:
    """(model_fn, image shape HWC, label) for a model name and size, optionally with config
    fields replaced (e.g. {"depth": 2}); UsageError when unknown."""
    if model != "vit":
        raise UsageError(f"unknown model {model!r}; choose one of: vit")
    from flax import nnx

    from jaxdist.models import ViT, vit_config

    cfg = vit_config(size, **(overrides or {}))
    label = f"{model}-{size}" + "".join(f",{k}={v}" for k, v in (overrides or {}).items())
    return (lambda: ViT(cfg, rngs=nnx.Rngs(0)), (cfg.image_size, cfg.image_size, cfg.channels),
            label)


def candidate_meshes(strategy: str, n: int) -> list[str]:
    """The meshes worth planning for `strategy` on `n` devices (see docs/planning.md)."""
    if strategy in ("dp", "zero1"):
        return [f"data={n}"]
    if strategy == "fsdp":
        meshes = [f"fsdp={n}"]
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"data=2,fsdp={n // 2}")
        return meshes
    if strategy == "tp":
        return [f"data={n // 2},tensor=2"] if n % 2 == 0 else []
    if strategy == "fsdp_tp":
        meshes = []
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"fsdp={n // 2},tensor=2")
        if n % 4 == 0 and n // 4 >= 2:
            meshes.append(f"data=2,fsdp={n // 4},tensor=2")
        return meshes
    raise UsageError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


@dataclasses.dataclass
class PlanRow:
    model: str
    n: int
    strategy: str
    mesh: str
    memory: Any = None  # MemoryReport, None when skipped
    wire_bytes: float = 0.0
    collectives: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    fits: bool = False
    reason: str = ""  # why skipped or rejected; empty when it fits
    compile_s: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.memory is None

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def _reject_reason(memory: Any, budget_bytes: float) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    return (f"needs {gib(memory.peak_estimate)} GiB/device > {budget_bytes / GIB:g} GiB budget "
            f"(params {gib(memory.params)}, optimizer {gib(memory.optimizer)}, "
            f"temp {gib(memory.temp)})")


def plan_config(model: str, size: str, n: int, strategy: str, mesh_shape: str, *,
                memory_gib: float, global_batch: int, tx: Any, assumptions: Assumptions,
                devices: Sequence[Any] | None = None, overrides: dict | None = None) -> PlanRow:
    """One row: compile `strategy` on `mesh_shape` over the first `n` CPU devices and estimate.

    Rules that reject the model (a dimension that does not divide) and batches that do not split
    give a skipped row with the reason; a peak over the budget gives a rejected row."""
    import jax
    import numpy as np

    from jaxdist.parallel import ShardedTrainer, make_mesh
    from jaxdist.parallel.rules import batch_ways, rules_for

    model_fn, image_shape, label = model_spec(model, size, overrides)
    row = PlanRow(label, n, strategy, mesh_shape)
    loss_fn = _loss_fn()
    if devices is None:
        devices = jax.devices("cpu")
    try:
        mesh = make_mesh(mesh_shape, list(devices)[:n])
        ways = batch_ways(mesh, rules_for(strategy))
        if global_batch % ways:
            raise UsageError(f"global batch {global_batch} does not split into {ways} pieces")
        trainer = ShardedTrainer(model_fn, tx, loss_fn, mesh=mesh, strategy=strategy)
    except UsageError as e:
        row.reason = f"skipped: {e}"
        return row
    batch = (jax.ShapeDtypeStruct((global_batch, *image_shape), np.uint8),
             jax.ShapeDtypeStruct((global_batch,), np.int32))
    try:
        analysis = analyze_step(trainer, batch)
    except Exception as e:  # noqa: BLE001 - one failed config must not end a long plan
        first = (str(e).strip().splitlines() or [""])[0][:160]
        row.reason = f"skipped: compile failed: {type(e).__name__}: {first}"
        return row
    budget = memory_gib * GIB
    row.memory = analysis.memory
    row.wire_bytes = analysis.ledger.total(wire=True)
    row.collectives = analysis.ledger.count()
    row.compute_s = compute_seconds(analysis.flops, assumptions)
    row.comm_s = comm_seconds(analysis.ledger, assumptions)
    row.compile_s = analysis.compile_s
    row.fits = analysis.memory.peak_estimate <= budget
    if not row.fits:
        row.reason = "rejected: " + _reject_reason(analysis.memory, budget)
    return row


def _loss_fn() -> Callable:
    """The MNIST training loss the planned models are compiled with."""
    from jaxdist.models.classification import mnist_loss

    return mnist_loss


def make_tx(optimizer: str) -> Any:
    from jaxdist.train import OptimizerConfig, make_optimizer

    return make_optimizer(OptimizerConfig(name=optimizer, schedule="constant"), 1)


def validate_inputs(model: str, sizes: Sequence[str], device_counts: Sequence[int],
                    strategies: Sequence[str], memory_gib: float, global_batch: int,
                    optimizer: str, assumptions: Assumptions) -> None:
    """UsageError for anything the planner cannot plan, before any compile."""
    from jaxdist.train.optim import OPTIMIZERS

    if not sizes:
        raise UsageError("give at least one model size")
    for size in sizes:
        model_spec(model, size)
    if not device_counts:
        raise UsageError("give at least one device count, e.g. --devices 8,16")
    for n in device_counts:
        if n < 1:
            raise UsageError(f"device counts must be at least 1, got {n}")
    if not strategies:
        raise UsageError("give at least one strategy")
    for s in strategies:
        if s not in STRATEGIES:
            raise UsageError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    if not memory_gib > 0:
        raise UsageError(f"the memory budget must be positive, got {memory_gib:g} GiB")
    if global_batch < 1:
        raise UsageError(f"the global batch must be at least 1, got {global_batch}")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for name in ("peak_tflops", "bandwidth_gbps"):
        if not getattr(assumptions, name) > 0:
            raise UsageError(f"--{name} must be positive, got {getattr(assumptions, name):g}")
    if assumptions.latency_us < 0:
        raise UsageError(f"--latency_us must not be negative, got {assumptions.latency_us:g}")


def plan(model: str = "vit", sizes: Sequence[str] = ("small",),
         device_counts: Sequence[int] = (8,), strategies: Sequence[str] = STRATEGIES, *,
         memory_gib: float = DEFAULT_MEMORY_GIB, global_batch: int = DEFAULT_GLOBAL_BATCH,
         optimizer: str = "adam", assumptions: Assumptions = Assumptions(),
         progress: TextIO | None = None) -> list[PlanRow]:
    """Every row of the plan; progress lines go to `progress` (default stderr). Needs at least
    max(device_counts) CPU devices: call `jaxdist.cluster.configure_cpu_devices(max(
    device_counts))` before JAX starts."""
    progress = progress or sys.stderr
    validate_inputs(model, sizes, device_counts, strategies, memory_gib, global_batch,
                    optimizer, assumptions)
    import jax

    devices = jax.devices("cpu")
    if max(device_counts) > len(devices):
        raise UsageError(
            f"planning for {max(device_counts)} devices needs as many virtual CPU devices, but "
            f"JAX started with {len(devices)}; call configure_cpu_devices({max(device_counts)}) "
            f"before JAX starts (python -m jaxdist.plan does)")
    tx = make_tx(optimizer)
    todo = [(size, n, s, m) for size in sizes for n in device_counts for s in strategies
            for m in candidate_meshes(s, n)]
    rows, began = [], time.perf_counter()
    for i, (size, n, strategy, mesh) in enumerate(todo, 1):
        print(f"plan: [{i}/{len(todo)}] {model}-{size} n={n} {strategy} {mesh} ...",
              end="", file=progress, flush=True)
        start = time.perf_counter()
        row = plan_config(model, size, n, strategy, mesh, memory_gib=memory_gib,
                          global_batch=global_batch, tx=tx, assumptions=assumptions,
                          devices=devices)
        rows.append(row)
        done = ("skipped" if row.skipped else
                f"peak {row.memory.peak_estimate / GIB:.2f} GiB, step {row.step_s * 1e3:.1f} ms")
        print(f" {time.perf_counter() - start:.1f} s ({done})", file=progress, flush=True)
    print(f"plan: {len(todo)} configs in {time.perf_counter() - began:.0f} s", file=progress,
          flush=True)
    return rows


def recommend(rows: Sequence[PlanRow]) -> dict[tuple[str, int], PlanRow | None]:
    """(model, n) -> the fastest row that fits (ties: the smaller peak), or None."""
    best: dict[tuple[str, int], PlanRow | None] = {}
    for row in rows:
        key = (row.model, row.n)
        best.setdefault(key, None)
        if row.skipped or not row.fits:
            continue
        current = best[key]
        if current is None or (row.step_s, row.memory.peak_estimate) < (
                current.step_s, current.memory.peak_estimate):
            best[key] = row
    return best


def format_plan(rows: Sequence[PlanRow], *, memory_gib: float, global_batch: int,
                optimizer: str, assumptions: Assumptions) -> str:
    """The assumptions, the table and the recommendations, as text."""
    lines = assumptions.describe()
    lines.append(f"- budget {memory_gib:g} GiB per device; global batch {global_batch} (uint8 "
                 f"28x28x1 images, int32 labels); optimizer {optimizer}; fp32 parameters")
    lines.append("")
    head = (f"{'model':<10} {'n':>4} {'strategy':<8} {'mesh':<24} {'params':>8} {'optim':>8} "
            f"{'grads':>8} {'temp':>8} {'peak':>8} {'comm MiB':>9} {'compute':>8} {'comm':>8} "
            f"{'step':>8}  fits")
    lines += [head, f"{'':<48}{'(memory: MiB per device)':<44}"
                    f"{'(per device per step)':<10}{'':>7}(ms)"]
    for r in rows:
        prefix = f"{r.model:<10} {r.n:>4} {r.strategy:<8} {r.mesh:<24}"
        if r.skipped:
            lines.append(f"{prefix} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>9} "
                         f"{'-':>8} {'-':>8} {'-':>8}  {r.reason}")
            continue
        m = r.memory
        lines.append(
            f"{prefix} {m.params / MIB:>8.1f} {m.optimizer / MIB:>8.1f} {m.grads / MIB:>8.1f} "
            f"{m.temp / MIB:>8.1f} {m.peak_estimate / MIB:>8.1f} {r.wire_bytes / MIB:>9.1f} "
            f"{r.compute_s * 1e3:>8.2f} {r.comm_s * 1e3:>8.2f} {r.step_s * 1e3:>8.2f}  "
            + ("yes" if r.fits else f"NO: {r.reason.removeprefix('rejected: ')}"))
    lines += ["", "Recommended (fastest that fits):"]
    for (model, n), row in recommend(rows).items():
        if row is None:
            lines.append(f"  {model:<10} n={n:<4} none fits in {memory_gib:g} GiB/device")
        else:
            lines.append(f"  {model:<10} n={n:<4} {row.strategy} {row.mesh}: "
                         f"{row.step_s * 1e3:.2f} ms/step, peak "
                         f"{row.memory.peak_estimate / GIB:.2f} GiB/device")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other UsageError
        raise UsageError(message)


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--devices takes comma-separated integers, e.g. 8,16,32; got {text!r}")


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jaxdist.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit", help="model family (vit)")
    p.add_argument("--vit_size", default="small",
                   help="one or more ViT sizes, comma separated: tiny, small, base, large")
    p.add_argument("--devices", default="8", help="device counts, comma separated (e.g. 8,16,32)")
    p.add_argument("--memory_gib", type=float, default=DEFAULT_MEMORY_GIB,
                   help="memory budget per device, GiB")
    p.add_argument("--bandwidth_gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS,
                   help="network bandwidth per device per direction, Gbit/s")
    p.add_argument("--latency_us", type=float, default=DEFAULT_LATENCY_US,
                   help="latency (alpha) of one ring step, microseconds")
    p.add_argument("--peak_tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="assumed peak compute per device, TFLOP/s (a stated assumption)")
    p.add_argument("--global_batch", type=int, default=DEFAULT_GLOBAL_BATCH)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma separated, from " + ", ".join(STRATEGIES))
    p.add_argument("--optimizer", default="adam")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        counts = _ints(args.devices)
        sizes, strategies = _names(args.vit_size), _names(args.strategies)
        assumptions = Assumptions(peak_tflops=args.peak_tflops, latency_us=args.latency_us,
                                  bandwidth_gbps=args.bandwidth_gbps)
        validate_inputs(args.model, sizes, counts, strategies, args.memory_gib,
                        args.global_batch, args.optimizer, assumptions)
        from jaxdist.cluster import configure_cpu_devices

        configure_cpu_devices(max(counts))  # before anything asks JAX for devices
        rows = plan(args.model, sizes, counts, strategies, memory_gib=args.memory_gib,
                    global_batch=args.global_batch, optimizer=args.optimizer,
                    assumptions=assumptions)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(rows, memory_gib=args.memory_gib, global_batch=args.global_batch,
                      optimizer=args.optimizer, assumptions=assumptions), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
