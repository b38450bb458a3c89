"""Candidate meshes per strategy and device count, one planned row per compile, the plan and its
recommendations."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Sequence, TextIO

from jaxdist.errors import UsageError
from jaxdist.parallel.strategies import STRATEGIES
from jaxdist.plan.analysis import analyze_step
from jaxdist.plan.cost import GIB, MIB, Assumptions, comm_seconds, compute_seconds
from jaxdist.plan.models import MODELS, inputs, planned_model

DEFAULT_MEMORY_GIB = 16.0
DEFAULT_GLOBAL_BATCH = 256

# The planner plans the model-parallel strategies of the one registry (`jaxdist.STRATEGIES`); when
# --strategies is not given all of them, but sp for the ViT: it names no activations, so sp would
# be tp again; and not ep, but for a mixture of experts (`plan` adds it): without experts ep would
# be fsdp again.
DEFAULT_STRATEGIES = {model: tuple(name for name, s in STRATEGIES.items()
                                   if s.parallelism == "model" and name != "ep"
                                   and (model, name) != ("vit", "sp"))
                      for model in MODELS}
PIPELINE_STAGES = (2, 4)  # pipeline sizes planned for the LM where they divide n and its depth
SCHEDULES = ("gpipe", "1f1b", "interleaved")
VIRTUAL_STAGES = 2  # chunks per device of the interleaved rows
# (strategy, schedule) pairs not compiled on pipeline meshes, with the reason the row shows (a
# compile that would abort the whole process, not an exception the planner can catch). None now:
# fsdp_tp with 1F1B, which aborted XLA as one masked forward-and-backward program per unit,
# compiles as the fused ticks of `jaxdist.parallel.pipeline_1f1b`.
NOT_PLANNED: dict[tuple[str, str], str] = {}
# context parallelism (the sequence split over C devices, ring attention) is planned for the
# language models, whose attention runs over a split sequence (`jaxdist.models.attention`), at
# these C where they divide n, by default only for windows this long: shorter ones fit with data
# parallelism
CONTEXT_SIZES = (4, 8)
LONG_WINDOW = 32768


def candidate_meshes(strategy: str, n: int, layers: int | None = None,
                     stages: Sequence[int] | None = None, experts: int | None = None,
                     context: Sequence[int] = ()) -> list[str]:
    """The meshes worth planning for `strategy` on `n` devices (see docs/planning.md).

    With `layers` (a model with a layer stack, the LM) it adds pipeline meshes: for each S of
    `stages` (default `PIPELINE_STAGES`) that divides n and `layers`, the strategy's first mesh
    on n / S devices with `pipeline=S` (dp, zero1 `data=n/S,pipeline=S`; fsdp
    `fsdp=n/S,pipeline=S`; tp, sp `data=n/2S,tensor=2,pipeline=S`; fsdp_tp
    `fsdp=n/2S,tensor=2,pipeline=S` when n/2S >= 2; ep, whose mixture of experts does not
    pipeline, none). ep with `experts` (the model's): expert groups of g = gcd(n, experts)
    devices, the rest fsdp (`fsdp=n/g,expert=g`, `data=2,fsdp=n/2g,expert=g`), and groups of
    g/2 and of 8. For each C of `context` that divides n (not under ep), the strategy's first
    mesh on n / C devices with `context=C` (e.g. fsdp `fsdp=n/C,context=C`)."""
    meshes = _candidate_meshes(strategy, n, layers, stages, experts)
    for c in context if strategy != "ep" else ():
        first = _candidate_meshes(strategy, n // c)[:1] if c > 1 and n % c == 0 else []
        meshes += [f"{mesh},context={c}" for mesh in first]
    return meshes


def _candidate_meshes(strategy: str, n: int, layers: int | None = None,
                      stages: Sequence[int] | None = None, experts: int | None = None
                      ) -> list[str]:
    if strategy in ("dp", "zero1"):
        meshes = [f"data={n}"]
    elif strategy == "fsdp":
        meshes = [f"fsdp={n}"]
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"data=2,fsdp={n // 2}")
    elif strategy in ("tp", "sp"):
        meshes = [f"data={n // 2},tensor=2"] if n % 2 == 0 else []
    elif strategy == "ep" and experts:
        return _expert_meshes(n, experts)
    elif strategy == "ep":
        meshes = [f"expert={n}"]
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"fsdp=2,expert={n // 2}")
        return meshes
    elif strategy == "fsdp_tp":
        meshes = []
        if n % 2 == 0 and n // 2 >= 2:
            meshes.append(f"fsdp={n // 2},tensor=2")
        if n % 4 == 0 and n // 4 >= 2:
            meshes.append(f"data=2,fsdp={n // 4},tensor=2")
    else:
        raise UsageError(f"unknown strategy {strategy!r}; choose from "
                         f"{', '.join(DEFAULT_STRATEGIES['lm'])}")
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


def _expert_meshes(n: int, experts: int) -> list[str]:
    """ep meshes for a mixture of `experts` on n devices (see `candidate_meshes`)."""
    group = math.gcd(n, experts)
    meshes = []
    # the largest groups (fewest experts a device), half that, and 8 (more fsdp: it shards the
    # attention and embeddings, which the expert axis replicates)
    for g in sorted({group, group // 2 if group >= 4 else group, min(group, 8)}, reverse=True):
        rest = n // g
        meshes.append(f"expert={g}" if rest == 1 else f"fsdp={rest},expert={g}")
        if rest % 2 == 0 and rest // 2 >= 2:
            meshes.append(f"data=2,fsdp={rest // 2},expert={g}")
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
    schedule: str = ""  # pipeline rows: "gpipe", "1f1b" or "interleaved"; empty without one
    microbatches: int = 0  # pipeline rows: M
    bubble: float = 0.0  # pipeline rows: pipeline.bubble_fraction of the schedule
    inputs: str = ""  # what one example is (ModelSpec.inputs)
    flops_from: str = "xla"  # "xla": the compiled step's cost analysis; "model": the LM's FLOPs
    all_to_all_bytes: float = 0.0  # of wire_bytes: the all-to-alls' (expert parallelism)
    permute_bytes: float = 0.0  # of wire_bytes: the collective-permutes' (ring attention, pipes)

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
    ("gpipe", "1f1b" or "interleaved" of 2 chunks per device) and `microbatches` M (default 2 S).
    Rules that reject the model (a dimension that does not divide), batches that do not split and
    stacks that do not split into S stages give a skipped row with the reason; a peak over the
    budget gives a rejected row."""
    import jax

    from jaxdist.parallel import Pipeline, Trainer, make_mesh
    from jaxdist.parallel.pipeline import bubble_fraction
    from jaxdist.parallel.rules import batch_ways

    planned = planned_model(model, size, overrides)
    layers = planned.pipeline_layers
    row = PlanRow(planned.label, n, strategy, mesh_shape, inputs=inputs(planned),
                  flops_from="xla" if planned.spec.train_flops is None else "model")
    if devices is None:
        devices = jax.devices("cpu")
    try:
        mesh = make_mesh(mesh_shape, list(devices)[:n])
        rules = STRATEGIES[strategy]
        ways = batch_ways(mesh, rules)
        if global_batch % ways:
            raise UsageError(f"global batch {global_batch} does not split into {ways} pieces")
        stages = mesh.shape["pipeline"]
        context = mesh.shape["context"]
        window = getattr(planned.config, "seq_len", 0)
        if context > 1 and window % (2 * context):
            raise UsageError(f"a window of {window} tokens does not split into {2 * context} "
                             f"chunks (2 per device of context={context})")
        value: Any = rules
        if stages > 1:
            m = 2 * stages if microbatches is None else microbatches
            row.schedule, row.microbatches = schedule, m
            row.bubble = bubble_fraction(stages, m, schedule, VIRTUAL_STAGES)
            if (strategy, schedule) in NOT_PLANNED:
                raise UsageError(NOT_PLANNED[strategy, schedule])
            if layers is None:
                raise UsageError(f"{planned.label} has no layer stack to split into pipeline "
                                 f"stages")
            if layers % stages:
                raise UsageError(f"{planned.label}'s {layers} layers do not split into "
                                 f"{stages} pipeline stages")
            if global_batch % (ways * m):
                raise UsageError(f"global batch {global_batch} does not split into {m} "
                                 f"microbatches on each of {ways} data-parallel groups")
            if schedule == "interleaved" and (layers % (stages * VIRTUAL_STAGES) or m < stages):
                raise UsageError(f"interleaved needs {stages} x {VIRTUAL_STAGES} chunks of "
                                 f"{planned.label}'s {layers} layers and M >= {stages}")
            value = Pipeline(rules=rules, microbatches=m, schedule=schedule,
                             virtual_stages=VIRTUAL_STAGES)
        trainer = Trainer(planned.model_fn(), tx, planned.loss_fn, mesh=mesh, strategy=value)
    except UsageError as e:
        row.reason = f"skipped: {e}"
        return row
    try:
        analysis = analyze_step(trainer, planned.batch(global_batch))
    except Exception as e:  # noqa: BLE001 - one failed config must not end a long plan
        first = (str(e).strip().splitlines() or [""])[0][:160]
        row.reason = f"skipped: compile failed: {type(e).__name__}: {first}"
        return row
    budget = memory_gib * GIB
    model_flops = planned.step_flops(global_batch)
    flops = analysis.flops if model_flops is None else model_flops / n
    # Pipeline ticks have no conditional, so the HLO's ledger, with the loops' trip counts, is
    # what each stage sends.
    ledger = analysis.ledger
    row.memory = analysis.memory
    row.wire_bytes = ledger.total(wire=True)
    row.all_to_all_bytes = ledger.total("all-to-all", wire=True)
    row.permute_bytes = ledger.total("collective-permute", wire=True)
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
                    pipeline_microbatches: int | None = None,
                    context: Sequence[int] | None = None) -> None:
    """UsageError for anything the planner cannot plan, before any compile."""
    from jaxdist.train.optim import OPTIMIZERS

    if model not in MODELS:
        raise UsageError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    if not sizes:
        raise UsageError("give at least one model size")
    variants = [planned_model(model, size, overrides) for size in sizes]
    if not device_counts:
        raise UsageError("give at least one device count, e.g. --devices 8,16")
    for n in device_counts:
        if n < 1:
            raise UsageError(f"device counts must be at least 1, got {n}")
    if not strategies:
        raise UsageError("give at least one strategy")
    for s in strategies:
        if s not in STRATEGIES or STRATEGIES[s].parallelism != "model":
            raise UsageError(f"unknown strategy {s!r}; the planner plans the model-parallel ones: "
                             f"{', '.join(DEFAULT_STRATEGIES['lm'])}")
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
        raise UsageError(f"give at least one pipeline schedule ({', '.join(SCHEDULES)})")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            raise UsageError(f"unknown pipeline schedule {schedule!r}; choose from "
                             f"{', '.join(SCHEDULES)}")
    if context is not None and any(c < 1 for c in context):
        raise UsageError(f"context sizes must be at least 1, got {tuple(context)}")
    if pipeline_microbatches is not None and pipeline_microbatches < 1:
        raise UsageError(f"--pipeline_microbatches must be at least 1, got "
                         f"{pipeline_microbatches}")
    if pipeline_stages is None:  # the defaults: planned where they divide, silently
        return
    for stages in pipeline_stages:
        if stages < 1:
            raise UsageError(f"pipeline sizes must be at least 1, got {stages}")
        for variant in variants:
            layers = variant.pipeline_layers
            if stages > 1 and layers is None:
                raise UsageError(f"{variant.label} has no layer stack to split into pipeline "
                                 f"stages (pipelines are planned for --model lm)")
            if stages > 1 and layers % stages:
                raise UsageError(f"{variant.label}'s {layers} layers do not split into "
                                 f"{stages} pipeline stages; choose pipeline sizes that divide "
                                 f"{layers}")


def plan(model: str = "vit", sizes: Sequence[str] = ("small",),
         device_counts: Sequence[int] = (8,), strategies: Sequence[str] | None = None, *,
         memory_gib: float = DEFAULT_MEMORY_GIB, global_batch: int = DEFAULT_GLOBAL_BATCH,
         optimizer: str = "adam", assumptions: Assumptions = Assumptions(),
         overrides: dict | None = None, pipeline_stages: Sequence[int] | None = None,
         schedules: Sequence[str] = SCHEDULES, pipeline_microbatches: int | None = None,
         context: Sequence[int] | None = None, progress: TextIO | None = None
         ) -> list[PlanRow]:
    """Every row of the plan; progress lines go to `progress` (default stderr). Needs at least
    max(device_counts) CPU devices: call `jaxdist.cluster.configure_cpu_devices(max(
    device_counts))` before JAX starts.

    `strategies` default: `DEFAULT_STRATEGIES[model]`. For a model with a layer stack (the LM)
    every pipeline size of `pipeline_stages` (default `PIPELINE_STAGES`, where they divide n and
    the depth) is planned under each of `schedules`, with `pipeline_microbatches` (default 2 S).
    A dense LM is planned with its sequence split over each context size C of `context`
    (default `CONTEXT_SIZES` for windows of `LONG_WINDOW` tokens or more, else none) that
    divides n: ring attention, activations / C, the ring's collective-permutes in `comm`.
    """
    progress = progress or sys.stderr
    if strategies is None:
        strategies = DEFAULT_STRATEGIES.get(model, DEFAULT_STRATEGIES["lm"])
        if any(_experts(planned_model(model, size, overrides)) for size in sizes):
            strategies = (*strategies, "ep")
    validate_inputs(model, sizes, device_counts, strategies, memory_gib, global_batch,
                    optimizer, assumptions, overrides=overrides, pipeline_stages=pipeline_stages,
                    schedules=schedules, pipeline_microbatches=pipeline_microbatches,
                    context=context)
    import jax

    from jaxdist.parallel.mesh import parse_mesh_shape

    devices = jax.devices("cpu")
    if max(device_counts) > len(devices):
        raise UsageError(
            f"planning for {max(device_counts)} devices needs as many virtual CPU devices, but "
            f"JAX started with {len(devices)}; call configure_cpu_devices({max(device_counts)}) "
            f"before JAX starts (python -m jaxdist.plan does)")
    tx = make_tx(optimizer)
    todo = []
    for size in sizes:
        planned = planned_model(model, size, overrides)
        experts = _experts(planned)  # a mixture of experts does not run in a pipeline yet
        layers = None if experts else planned.pipeline_layers
        sizes_c = _context_sizes(model, planned, context)
        for n in device_counts:
            for s in strategies:
                for mesh in candidate_meshes(s, n, layers, pipeline_stages, experts, sizes_c):
                    pipelined = parse_mesh_shape(mesh).get("pipeline", 1) > 1
                    todo += [(size, n, s, mesh, sch) for sch in (schedules if pipelined
                                                                 else ("",))]
    rows, began = [], time.perf_counter()
    label = lambda size: planned_model(model, size, overrides).label  # noqa: E731
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


def _context_sizes(model: str, planned: Any, context: Sequence[int] | None) -> Sequence[int]:
    """The context sizes planned for a model: a dense LM's (`plan`), none for the rest."""
    if model not in ("lm", "llama") or _experts(planned):
        return ()
    if context is None:
        return CONTEXT_SIZES if planned.config.seq_len >= LONG_WINDOW else ()
    return tuple(c for c in context if c > 1)


def _experts(planned: Any) -> int | None:
    """The mixture of experts' expert count of a planned model; None for a dense one."""
    moe = getattr(planned.config, "moe", None)
    return None if moe is None else moe.num_experts


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
