"""Pre-flight planner: memory, communication and step time per strategy and mesh, before any run.

    python -m jaxdist.plan --model vit --vit_size small,base,large --devices 8,16,32 \\
        --memory_gib 16 --bandwidth_gbps 100
    python -m jaxdist.plan --model lm --lm_size 1.3b,7b --devices 8,64 --memory_gib 80

For each model size, device count n, strategy and mesh it compiles the train step ahead of time
against a fake topology of n virtual CPU devices (no accelerator, nothing allocated: the state and
the batch are ShapeDtypeStructs), then reads

- memory per device from the compiled step's `memory_analysis()` (`jaxdist.observe.memory`),
- collective bytes per step per device from its partitioned HLO (`jaxdist.observe.ledger`),
- FLOPs per device from its `cost_analysis()` (the ViT) or, for the LM, whose layers run in a
  `lax.scan` that XLA's cost analysis counts once, the model's own FLOPs per token
  (`lm_step_flops`),

and turns them into an estimated step time with a stated model (`Assumptions`): compute = FLOPs /
peak (pipelines: / (1 - bubble)), communication = alpha-beta per collective over a ring, no
overlap. A config fits when its peak bytes per device are within the budget; the recommended mesh
for each n is the fastest that fits. For the LM it also plans pipeline meshes (`pipeline=S`, the
layer stack split over S stages) under both schedules, GPipe and 1F1B; a pipelined step's memory
is per device, i.e. per stage. See docs/planning.md.
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
MODELS = ("vit", "lm")
# planned when --strategies is not given: the ViT names no activations, so sp would be tp again
DEFAULT_STRATEGIES = {"vit": tuple(s for s in STRATEGIES if s != "sp"), "lm": STRATEGIES}
DEFAULT_SIZES = {"vit": "small", "lm": "125m"}
DEFAULT_LM_REMAT = "full"
PIPELINE_STAGES = (2, 4)  # pipeline sizes planned for the LM where they divide n and its depth
SCHEDULES = ("gpipe", "1f1b")
# (strategy, schedule) pairs not compiled on pipeline meshes, with the reason the row shows: XLA
# aborted the whole process (not an exception the planner can catch) compiling these
NOT_PLANNED = {("fsdp_tp", "1f1b"): "fsdp_tp with a 1F1B pipeline is not planned yet: XLA can "
               "abort the process compiling it (being fixed)"}


# ---------------------------------------------------------------------------------------------
# Analysis of one compiled step (shared with experiments/bench_parallel.py)


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
    hlo = compiled.as_text()
    return StepAnalysis(memory=memory_report(compiled, state, trainer.grad_shardings),
                        ledger=collective_ledger(hlo, trainer.num_devices),
                        flops=flops_per_device(compiled, lowered), compile_s=seconds, hlo=hlo)


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
            lines.append("- pipeline rows (pipeline=S, M microbatches, schedule gpipe or 1f1b): "
                         "compute / (1 - bubble), bubble = (S-1)/(M+S-1) for gpipe, "
                         "1 - M/units for 1f1b (each of its 2(M+S-1)-2 units computes a forward "
                         "and a backward), and the compute column includes it; memory is per "
                         "device, i.e. per stage, from the compile of that schedule")
        return lines + [
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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the planner compiles for one model size.

    Attributes:
        label: the table's name of it ("vit-base", "lm-1.3b", plus any overrides).
        config: the model's config (`ViTConfig` or `LMConfig`).
        model_fn: builds the model (called abstractly: nothing is allocated).
        loss_fn: the Trainer's loss, `loss_fn(model, batch)`.
        layers: depth of the layer stack a pipeline splits; None when the model has none.
        inputs: what one example is, for the printed assumptions.
    """

    label: str
    config: Any
    model_fn: Callable[[], Any]
    loss_fn: Callable
    layers: int | None
    inputs: str

    def batch(self, global_batch: int) -> tuple:
        """ShapeDtypeStructs of a global batch (no sharding: `abstract_batch` lays them out)."""
        import jax
        import numpy as np

        cfg = self.config
        if self.layers is None:  # the ViT: uint8 NHWC images and int32 labels
            return (jax.ShapeDtypeStruct((global_batch, cfg.image_size, cfg.image_size,
                                          cfg.channels), np.uint8),
                    jax.ShapeDtypeStruct((global_batch,), np.int32))
        tokens = jax.ShapeDtypeStruct((global_batch, cfg.seq_len), np.int32)
        return tokens, tokens  # (inputs, targets)

    def step_flops(self, global_batch: int) -> float | None:
        """Training FLOPs of one step summed over all devices, from the model's shapes (the
        LM); None: read XLA's cost analysis of the compiled step instead (the ViT)."""
        if self.layers is None:
            return None
        return lm_step_flops(self.config, global_batch * self.config.seq_len)


def lm_step_flops(cfg: Any, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens through the LM `cfg`, all devices together.

    `jaxdist.models.lm.flops_per_token` (6 N for the matmuls with the parameters, 12 L T E for
    attention's scores and mixing: forward and backward), plus the forward the backward pass
    computes again: the remat policy's (full: the blocks' forward but for the last matmul, whose
    output no gradient needs, 2 (N_layers - L E F) + 4 L T E per token; dots_no_batch:
    attention's scores and mixing, 4 L T E; dots and none: only elementwise work, not counted).
    A pipeline's extra work (GPipe's idle ticks, 1F1B's masked units) is its `bubble`. Matmuls
    only: XLA's count of one layer (where its cost analysis is right) is 3-4% higher, from
    elementwise work. XLA's own cost analysis is not used for the LM: it counts the body of a
    `lax.scan` (the layer stack, the pipeline's ticks) once."""
    from jaxdist.models.lm import flops_per_token, param_count

    layer_params = param_count(cfg) - param_count(dataclasses.replace(cfg, depth=0))
    attention = 4 * cfg.depth * cfg.seq_len * cfg.embed  # scores and mixing, forward
    block_forward = 2 * layer_params + attention
    again = {"none": 0, "dots": 0, "dots_no_batch": attention,
             "full": block_forward - 2 * cfg.depth * cfg.mlp * cfg.embed}[cfg.remat]
    return float(tokens) * (flops_per_token(cfg) + again)


def model_spec(model: str, size: str, overrides: dict | None = None) -> ModelSpec:
    """The `ModelSpec` of a model name and size, optionally with config fields replaced (e.g.
    {"depth": 2}; the LM's `remat` defaults to `DEFAULT_LM_REMAT`); UsageError when unknown."""
    from flax import nnx

    overrides = dict(overrides or {})
    label = f"{model}-{size}" + "".join(f",{k}={v}" for k, v in overrides.items())
    fields = {"vit": "ViTConfig", "lm": "LMConfig"}
    if model in fields:
        import jaxdist.models.lm as lm
        import jaxdist.models.vit as vit

        known = {f.name for f in dataclasses.fields(
            vit.ViTConfig if model == "vit" else lm.LMConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UsageError(f"{fields[model]} has no field {unknown[0]!r}")
    if model == "vit":
        from jaxdist.models import ViT, vit_config
        from jaxdist.models.classification import mnist_loss

        cfg = vit_config(size, **overrides)
        return ModelSpec(label, cfg, lambda: ViT(cfg, rngs=nnx.Rngs(0)), mnist_loss, None,
                         f"uint8 {cfg.image_size}x{cfg.image_size}x{cfg.channels} images, "
                         f"int32 labels")
    if model == "lm":
        from jaxdist.models.lm import GPT, lm_config, lm_loss

        cfg = lm_config(size, **{"remat": DEFAULT_LM_REMAT, **overrides})
        return ModelSpec(label, cfg, lambda: GPT(cfg, rngs=nnx.Rngs(0)), lm_loss, cfg.depth,
                         f"sequences of {cfg.seq_len} int32 tokens, inputs and targets; "
                         f"remat {cfg.remat}")
    raise UsageError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")


def candidate_meshes(strategy: str, n: int, layers: int | None = None,
                     stages: Sequence[int] | None = None) -> list[str]:
    """The meshes worth planning for `strategy` on `n` devices (see docs/planning.md).

    With `layers` (a model with a layer stack, the LM) it adds pipeline meshes: for each S of
    `stages` (default `PIPELINE_STAGES`) that divides n and `layers`, the strategy's first mesh
    on n / S devices with `pipeline=S` (dp, zero1 `data=n/S,pipeline=S`; fsdp
    `fsdp=n/S,pipeline=S`; tp, sp `data=n/2S,tensor=2,pipeline=S`; fsdp_tp
    `fsdp=n/2S,tensor=2,pipeline=S` when n/2S >= 2)."""
    if strategy in ("dp", "zero1"):
        meshes = [f"data={n}"]
    elif strategy == "fsdp":
        meshes = [f"fsdp={n}"]
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"data=2,fsdp={n // 2}")
    elif strategy in ("tp", "sp"):
        meshes = [f"data={n // 2},tensor=2"] if n % 2 == 0 else []
    elif strategy == "fsdp_tp":
        meshes = []
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"fsdp={n // 2},tensor=2")
        if n % 4 == 0 and n // 4 >= 2:
            meshes.append(f"data=2,fsdp={n // 4},tensor=2")
    else:
        raise UsageError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if layers is None:
        return meshes
    for s in PIPELINE_STAGES if stages is None else stages:
        if s < 2 or n % s or layers % s:
            continue
        rest = n // s
        if strategy in ("dp", "zero1"):
            meshes.append(f"data={rest},pipeline={s}")
        elif strategy == "fsdp":
            meshes.append(f"fsdp={rest},pipeline={s}")
        elif strategy in ("tp", "sp") and rest % 2 == 0:
            meshes.append(f"data={rest // 2},tensor=2,pipeline={s}")
        elif strategy == "fsdp_tp" and rest % 2 == 0 and rest // 2 >= 2:
            meshes.append(f"fsdp={rest // 2},tensor=2,pipeline={s}")
    return meshes


@dataclasses.dataclass
class PlanRow:
    model: str
    n: int
    strategy: str
    mesh: str
    memory: Any = None  # MemoryReport, None when skipped
    wire_bytes: float = 0.0
    collectives: int = 0
    compute_s: float = 0.0  # FLOPs / peak, without the pipeline's bubble
    comm_s: float = 0.0
    fits: bool = False
    reason: str = ""  # why skipped or rejected; empty when it fits
    compile_s: float = 0.0
    schedule: str = ""  # pipeline rows: "gpipe" or "1f1b"; empty without a pipeline
    microbatches: int = 0  # pipeline rows: M
    bubble: float = 0.0  # pipeline rows: pipeline.bubble_fraction of the schedule
    inputs: str = ""  # what one example is (ModelSpec.inputs)
    flops_from: str = "xla"  # "xla": the compiled step's cost analysis; "model": the LM's FLOPs

    @property
    def skipped(self) -> bool:
        return self.memory is None

    @property
    def busy_s(self) -> float:
        """Compute time including the pipeline's extra work: compute / (1 - bubble)."""
        return self.compute_s / (1 - self.bubble)

    @property
    def step_s(self) -> float:
        return self.busy_s + self.comm_s


def _reject_reason(memory: Any, budget_bytes: float) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    return (f"needs {gib(memory.peak_estimate)} GiB/device > {budget_bytes / GIB:g} GiB budget "
            f"(params {gib(memory.params)}, optimizer {gib(memory.optimizer)}, "
            f"temp {gib(memory.temp)})")


def plan_config(model: str, size: str, n: int, strategy: str, mesh_shape: str, *,
                memory_gib: float, global_batch: int, tx: Any, assumptions: Assumptions,
                devices: Sequence[Any] | None = None, overrides: dict | None = None,
                schedule: str = "gpipe", microbatches: int | None = None) -> PlanRow:
    """One row: compile `strategy` on `mesh_shape` over the first `n` CPU devices and estimate.

    On a mesh with pipeline=S > 1 the layer stack is split over S stages, run with `schedule`
    ("gpipe" or "1f1b") and `microbatches` M (default 2 S). Rules that reject the model (a
    dimension that does not divide), batches that do not split and stacks that do not split into
    S stages give a skipped row with the reason; a peak over the budget gives a rejected row."""
    import jax

    from jaxdist.parallel import ShardedTrainer, make_mesh
    from jaxdist.parallel.pipeline import bubble_fraction
    from jaxdist.parallel.rules import batch_ways, rules_for

    spec = model_spec(model, size, overrides)
    row = PlanRow(spec.label, n, strategy, mesh_shape, inputs=spec.inputs,
                  flops_from="xla" if spec.layers is None else "model")
    if devices is None:
        devices = jax.devices("cpu")
    try:
        mesh = make_mesh(mesh_shape, list(devices)[:n])
        ways = batch_ways(mesh, rules_for(strategy))
        if global_batch % ways:
            raise UsageError(f"global batch {global_batch} does not split into {ways} pieces")
        stages = mesh.shape["pipeline"]
        options: dict[str, Any] = {}
        if stages > 1:
            m = 2 * stages if microbatches is None else microbatches
            row.schedule, row.microbatches = schedule, m
            row.bubble = bubble_fraction(stages, m, schedule)
            if (strategy, schedule) in NOT_PLANNED:
                raise UsageError(NOT_PLANNED[strategy, schedule])
            if spec.layers is None:
                raise UsageError(f"{spec.label} has no layer stack to split into pipeline stages")
            if spec.layers % stages:
                raise UsageError(f"{spec.label}'s {spec.layers} layers do not split into "
                                 f"{stages} pipeline stages")
            if global_batch % (ways * m):
                raise UsageError(f"global batch {global_batch} does not split into {m} "
                                 f"microbatches on each of {ways} data-parallel groups")
            options = dict(pipeline_microbatches=m, pipeline_schedule=schedule)
        trainer = ShardedTrainer(spec.model_fn, tx, spec.loss_fn, mesh=mesh, strategy=strategy,
                                 **options)
    except UsageError as e:
        row.reason = f"skipped: {e}"
        return row
    try:
        analysis = analyze_step(trainer, spec.batch(global_batch))
    except Exception as e:  # noqa: BLE001 - one failed config must not end a long plan
        first = (str(e).strip().splitlines() or [""])[0][:160]
        row.reason = f"skipped: compile failed: {type(e).__name__}: {first}"
        return row
    budget = memory_gib * GIB
    model_flops = spec.step_flops(global_batch)
    flops = analysis.flops if model_flops is None else model_flops / n
    # Every 1F1B unit runs one masked program (no conditional), so the HLO's ledger, with the
    # loop's trip count, is what each stage sends.
    ledger = analysis.ledger
    row.memory = analysis.memory
    row.wire_bytes = ledger.total(wire=True)
    row.collectives = ledger.count()
    row.compute_s = compute_seconds(flops, assumptions)
    row.comm_s = comm_seconds(ledger, assumptions)
    row.compile_s = analysis.compile_s
    row.fits = analysis.memory.peak_estimate <= budget
    if not row.fits:
        row.reason = "rejected: " + _reject_reason(analysis.memory, budget)
    return row


def make_tx(optimizer: str) -> Any:
    from jaxdist.train import OptimizerConfig, make_optimizer

    return make_optimizer(OptimizerConfig(name=optimizer, schedule="constant"), 1)


def validate_inputs(model: str, sizes: Sequence[str], device_counts: Sequence[int],
                    strategies: Sequence[str], memory_gib: float, global_batch: int,
                    optimizer: str, assumptions: Assumptions, *, overrides: dict | None = None,
                    pipeline_stages: Sequence[int] | None = None,
                    schedules: Sequence[str] = SCHEDULES,
                    pipeline_microbatches: int | None = None) -> None:
    """UsageError for anything the planner cannot plan, before any compile."""
    from jaxdist.train.optim import OPTIMIZERS

    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    if not sizes:
        raise UsageError("give at least one model size")
    specs = [model_spec(model, size, overrides) for size in sizes]
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
    if not schedules:
        raise UsageError("give at least one pipeline schedule (gpipe, 1f1b)")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            raise UsageError(f"unknown pipeline schedule {schedule!r}; choose from "
                             f"{', '.join(SCHEDULES)}")
    if pipeline_microbatches is not None and pipeline_microbatches < 1:
        raise UsageError(f"--pipeline_microbatches must be at least 1, got "
                         f"{pipeline_microbatches}")
    if pipeline_stages is None:  # the defaults: planned where they divide, silently
        return
    for stages in pipeline_stages:
        if stages < 1:
            raise UsageError(f"pipeline sizes must be at least 1, got {stages}")
        for spec in specs:
            if stages > 1 and spec.layers is None:
                raise UsageError(f"{spec.label} has no layer stack to split into pipeline "
                                 f"stages (pipelines are planned for --model lm)")
            if stages > 1 and spec.layers % stages:
                raise UsageError(f"{spec.label}'s {spec.layers} layers do not split into "
                                 f"{stages} pipeline stages; choose pipeline sizes that divide "
                                 f"{spec.layers}")


def plan(model: str = "vit", sizes: Sequence[str] = ("small",),
         device_counts: Sequence[int] = (8,), strategies: Sequence[str] | None = None, *,
         memory_gib: float = DEFAULT_MEMORY_GIB, global_batch: int = DEFAULT_GLOBAL_BATCH,
         optimizer: str = "adam", assumptions: Assumptions = Assumptions(),
         overrides: dict | None = None, pipeline_stages: Sequence[int] | None = None,
         schedules: Sequence[str] = SCHEDULES, pipeline_microbatches: int | None = None,
         progress: TextIO | None = None) -> list[PlanRow]:
    """Every row of the plan; progress lines go to `progress` (default stderr). Needs at least
    max(device_counts) CPU devices: call `jaxdist.cluster.configure_cpu_devices(max(
    device_counts))` before JAX starts.

    `strategies` default: `DEFAULT_STRATEGIES[model]`. For a model with a layer stack (the LM)
    every pipeline size of `pipeline_stages` (default `PIPELINE_STAGES`, where they divide n and
    the depth) is planned under each of `schedules`, with `pipeline_microbatches` (default 2 S).
    """
    progress = progress or sys.stderr
    if strategies is None:
        strategies = DEFAULT_STRATEGIES.get(model, STRATEGIES)
    validate_inputs(model, sizes, device_counts, strategies, memory_gib, global_batch,
                    optimizer, assumptions, overrides=overrides, pipeline_stages=pipeline_stages,
                    schedules=schedules, pipeline_microbatches=pipeline_microbatches)
    import jax

    from jaxdist.parallel import parse_mesh_shape

    devices = jax.devices("cpu")
    if max(device_counts) > len(devices):
        raise UsageError(
            f"planning for {max(device_counts)} devices needs as many virtual CPU devices, but "
            f"JAX started with {len(devices)}; call configure_cpu_devices({max(device_counts)}) "
            f"before JAX starts (python -m jaxdist.plan does)")
    tx = make_tx(optimizer)
    todo = []
    for size in sizes:
        layers = model_spec(model, size, overrides).layers
        for n in device_counts:
            for s in strategies:
                for mesh in candidate_meshes(s, n, layers, pipeline_stages):
                    pipelined = parse_mesh_shape(mesh).get("pipeline", 1) > 1
                    todo += [(size, n, s, mesh, sch) for sch in (schedules if pipelined
                                                                 else ("",))]
    rows, began = [], time.perf_counter()
    label = lambda size: model_spec(model, size, overrides).label  # noqa: E731
    for i, (size, n, strategy, mesh, schedule) in enumerate(todo, 1):
        print(f"plan: [{i}/{len(todo)}] {label(size)} n={n} {strategy} {mesh}"
              + (f" {schedule}" if schedule else "") + " ...", end="", file=progress, flush=True)
        start = time.perf_counter()
        row = plan_config(model, size, n, strategy, mesh, memory_gib=memory_gib,
                          global_batch=global_batch, tx=tx, assumptions=assumptions,
                          devices=devices, overrides=overrides, schedule=schedule or "gpipe",
                          microbatches=pipeline_microbatches)
        rows.append(row)
        peak = 0 if row.skipped else row.memory.peak_estimate
        done = ("skipped" if row.skipped else
                f"peak {peak / GIB:.2f} GiB" if peak >= GIB / 10 else f"peak {peak / MIB:.1f} MiB")
        done += "" if row.skipped else f", step {row.step_s * 1e3:.1f} ms"
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


def _inputs_line(rows: Sequence[PlanRow]) -> str:
    by_model: dict[str, str] = {}
    for r in rows:
        by_model.setdefault(r.model, r.inputs or "uint8 28x28x1 images, int32 labels")
    texts = list(dict.fromkeys(by_model.values()))
    if len(texts) <= 1:
        return texts[0] if texts else "uint8 28x28x1 images, int32 labels"
    return "; ".join(f"{m}: {t}" for m, t in by_model.items())


def _config_name(r: PlanRow) -> str:
    return f"{r.strategy} {r.mesh}" + (f" {r.schedule} M={r.microbatches}" if r.schedule else "")


def format_plan(rows: Sequence[PlanRow], *, memory_gib: float, global_batch: int,
                optimizer: str, assumptions: Assumptions) -> str:
    """The assumptions, the table and the recommendations, as text.

    Pipeline rows add three columns: the schedule, the microbatches M and the bubble fraction;
    their `compute` includes the bubble (compute / (1 - bubble)), so compute + comm = step."""
    pipelines = any(r.schedule for r in rows)
    lines = assumptions.describe(
        xla_flops=not rows or any(r.flops_from == "xla" for r in rows),
        model_flops=any(r.flops_from == "model" for r in rows), pipelines=pipelines)
    lines.append(f"- budget {memory_gib:g} GiB per device; global batch {global_batch} "
                 f"({_inputs_line(rows)}); optimizer {optimizer}; fp32 parameters")
    lines.append("")
    mw = max([10] + [len(r.model) for r in rows])
    sw = max([24] + [len(r.mesh) for r in rows])
    pipe_head = f" {'sched':<5} {'M':>3} {'bubble':>6}" if pipelines else ""
    prefix_of = lambda model, n, strategy, mesh: (  # noqa: E731
        f"{model:<{mw}} {n:>4} {strategy:<8} {mesh:<{sw}}")
    head_prefix = prefix_of("model", "n", "strategy", "mesh") + pipe_head
    head = (f"{head_prefix} {'params':>8} {'optim':>8} {'grads':>8} {'temp':>8} {'peak':>8} "
            f"{'comm MiB':>9} {'compute':>8} {'comm':>8} {'step':>8}  fits")
    lines += [head, f"{'':<{len(head_prefix)}}{'(memory: MiB per device)':<44}"
                    f"{'(per device per step)':<10}{'':>7}(ms)"]
    for r in rows:
        prefix = prefix_of(r.model, r.n, r.strategy, r.mesh)
        if pipelines:
            prefix += (f" {r.schedule:<5} {r.microbatches:>3} {r.bubble:>6.2f}" if r.schedule
                       else f" {'-':<5} {'-':>3} {'-':>6}")
        if r.skipped:
            lines.append(f"{prefix} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>9} "
                         f"{'-':>8} {'-':>8} {'-':>8}  {r.reason}")
            continue
        m = r.memory
        lines.append(
            f"{prefix} {m.params / MIB:>8.1f} {m.optimizer / MIB:>8.1f} {m.grads / MIB:>8.1f} "
            f"{m.temp / MIB:>8.1f} {m.peak_estimate / MIB:>8.1f} {r.wire_bytes / MIB:>9.1f} "
            f"{r.busy_s * 1e3:>8.2f} {r.comm_s * 1e3:>8.2f} {r.step_s * 1e3:>8.2f}  "
            + ("yes" if r.fits else f"NO: {r.reason.removeprefix('rejected: ')}"))
    lines += ["", "Recommended (fastest that fits):"]
    for (model, n), row in recommend(rows).items():
        if row is None:
            lines.append(f"  {model:<{mw}} n={n:<4} none fits in {memory_gib:g} GiB/device")
        else:
            lines.append(f"  {model:<{mw}} n={n:<4} {_config_name(row)}: "
                         f"{row.step_s * 1e3:.2f} ms/step, peak "
                         f"{row.memory.peak_estimate / GIB:.2f} GiB/device")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other UsageError
        raise UsageError(message)


def _ints(text: str, flag: str = "--devices") -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, e.g. 8,16,32; got {text!r}")


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jaxdist.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit", help="model family: vit or lm")
    p.add_argument("--vit_size", default=DEFAULT_SIZES["vit"],
                   help="one or more ViT sizes, comma separated: tiny, small, base, large")
    p.add_argument("--lm_size", default=DEFAULT_SIZES["lm"],
                   help="one or more LM sizes, comma separated: test, tiny, small, 125m, 350m, "
                        "1.3b, 7b")
    p.add_argument("--remat", default=None,
                   help=f"LM only: remat policy of each block, none, full, dots, dots_no_batch "
                        f"(default {DEFAULT_LM_REMAT})")
    p.add_argument("--seq_len", type=int, default=None,
                   help="LM only: sequence length instead of the size's own")
    p.add_argument("--pipeline_stages", default=None,
                   help=f"LM only: pipeline sizes S, comma separated (default "
                        f"{','.join(map(str, PIPELINE_STAGES))} where they divide n and the "
                        f"depth; 1: no pipeline rows)")
    p.add_argument("--pipeline_microbatches", type=int, default=None,
                   help="LM only: microbatches M of every pipeline row (default 2 S)")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="LM only: pipeline schedules planned, comma separated: gpipe, 1f1b")
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
    p.add_argument("--strategies", default=None,
                   help="comma separated, from " + ", ".join(STRATEGIES) + " (default: all; "
                        "the ViT: all but sp, which is tp for a model without activation names)")
    p.add_argument("--optimizer", default="adam")
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        counts = _ints(args.devices)
        lm_flags = {"--remat": args.remat, "--seq_len": args.seq_len,
                    "--pipeline_stages": args.pipeline_stages,
                    "--pipeline_microbatches": args.pipeline_microbatches}
        overrides: dict[str, Any] = {}
        if args.model == "lm":
            sizes = _names(args.lm_size)
            if args.remat is not None:
                overrides["remat"] = args.remat
            if args.seq_len is not None:
                overrides["seq_len"] = args.seq_len
        else:
            sizes = _names(args.vit_size)
            given = [flag for flag, value in lm_flags.items() if value is not None]
            if given and args.model in MODELS:
                raise UsageError(f"{', '.join(given)}: options of --model lm, not "
                                 f"--model {args.model}")
        strategies = (DEFAULT_STRATEGIES.get(args.model, STRATEGIES) if args.strategies is None
                      else _names(args.strategies))
        stages = (None if args.pipeline_stages is None
                  else _ints(args.pipeline_stages, "--pipeline_stages"))
        schedules = _names(args.schedules)
        assumptions = Assumptions(peak_tflops=args.peak_tflops, latency_us=args.latency_us,
                                  bandwidth_gbps=args.bandwidth_gbps)
        options = dict(overrides=overrides, pipeline_stages=stages, schedules=schedules,
                       pipeline_microbatches=args.pipeline_microbatches)
        validate_inputs(args.model, sizes, counts, strategies, args.memory_gib,
                        args.global_batch, args.optimizer, assumptions, **options)
        from jaxdist.cluster import configure_cpu_devices

        configure_cpu_devices(max(counts))  # before anything asks JAX for devices
        rows = plan(args.model, sizes, counts, strategies, memory_gib=args.memory_gib,
                    global_batch=args.global_batch, optimizer=args.optimizer,
                    assumptions=assumptions, **options)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(rows, memory_gib=args.memory_gib, global_batch=args.global_batch,
                      optimizer=args.optimizer, assumptions=assumptions), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
