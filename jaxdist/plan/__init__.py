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
layer stack split over S stages) under each schedule, GPipe, 1F1B and interleaved; a pipelined
step's memory is per device, i.e. per stage. See docs/planning.md.

The package, one concern a module: `analysis` (compile one step, read memory, collectives and
FLOPs), `cost` (the step-time model, `Assumptions`), `models` (the registry's models at the
planner's defaults), `search` (candidate meshes, one row per config, the plan, the
recommendation), `report` (the text) and `cli` (`python -m jaxdist.plan`, its flags one
`PlanConfig`).
"""

from jaxdist.plan.analysis import (FAST_COMPILE, StepAnalysis, abstract_batch, analyze_step,
                                   flops_per_device)
from jaxdist.plan.cost import (GIB, MIB, Assumptions, comm_seconds, compute_seconds,
                               ring_steps)
from jaxdist.plan.models import (DEFAULT_LM_REMAT, DEFAULT_SIZES, MODELS, PLAN_DEFAULTS,
                                 planned_model)
from jaxdist.plan.search import (DEFAULT_STRATEGIES, NOT_PLANNED, PIPELINE_STAGES, SCHEDULES,
                                 PlanRow, candidate_meshes, make_tx, plan, plan_config, recommend,
                                 validate_inputs)
from jaxdist.plan.report import format_plan
from jaxdist.plan.cli import PlanConfig, main

__all__ = [
    "DEFAULT_LM_REMAT", "DEFAULT_SIZES", "DEFAULT_STRATEGIES", "FAST_COMPILE", "GIB", "MIB",
    "MODELS", "NOT_PLANNED", "PIPELINE_STAGES", "PLAN_DEFAULTS", "SCHEDULES",
    "Assumptions", "PlanConfig", "PlanRow", "StepAnalysis", "abstract_batch", "analyze_step",
    "candidate_meshes", "comm_seconds", "compute_seconds", "flops_per_device", "format_plan",
    "main", "make_tx", "plan", "plan_config", "planned_model", "recommend", "ring_steps",
    "validate_inputs",
]
