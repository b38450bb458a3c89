"""`python -m jaxdist.plan`: the flags (one typed config, `PlanConfig`, parsed by the project's
`jaxdist.config.parse_config`), checked before any compile, then the plan printed."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Literal, Sequence, TextIO

from jaxdist.errors import EXIT_USAGE, UsageError
from jaxdist.models.registry import get_model
from jaxdist.plan.cost import (DEFAULT_BANDWIDTH_GBPS, DEFAULT_LATENCY_US, DEFAULT_PEAK_TFLOPS,
                               Assumptions)
from jaxdist.plan.models import DEFAULT_SIZES
from jaxdist.plan.report import format_plan
from jaxdist.plan.search import (DEFAULT_GLOBAL_BATCH, DEFAULT_MEMORY_GIB, DEFAULT_STRATEGIES,
                                 SCHEDULES, plan, validate_inputs)

DESCRIPTION = ("Pre-flight planner: memory, communication and step time per strategy and mesh, "
               "before any run.")
LM_ONLY = ("remat", "seq_len", "pipeline_stages", "pipeline_microbatches", "context")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to plan, on how many devices, under which stated assumptions: one flag per field."""

    model: Literal["vit", "lm", "llama"] = "vit"
    """model family (a registered model with named sizes, `jaxdist.models.registry`)"""
    vit_size: tuple[str, ...] = (DEFAULT_SIZES["vit"],)
    """one or more ViT sizes, comma separated: tiny, small, base, large"""
    lm_size: tuple[str, ...] = (DEFAULT_SIZES["lm"],)
    """one or more LM sizes, comma separated: test, tiny, small, 125m, 350m, 1.3b, 7b"""
    llama_size: tuple[str, ...] = (DEFAULT_SIZES["llama"],)
    """one or more Llama sizes, comma separated: test, tiny, small, and the published shapes
    3.2-1b, 3.1-8b, 3.1-70b (Llama), qwen2.5-7b, mistral-7b, and the mixtures of experts
    mixtral-8x7b, deepseek-v3-like (planned under ep too)"""
    remat: Literal["none", "full", "dots", "dots_no_batch"] | None = None
    """LM only: remat policy of each block (default full)"""
    seq_len: int | None = None
    """LM only: sequence length instead of the size's own"""
    pipeline_stages: tuple[int, ...] | None = None
    """LM only: pipeline sizes S, comma separated (default 2,4 where they divide n and the depth;
    1: no pipeline rows)"""
    pipeline_microbatches: int | None = None
    """LM only: microbatches M of every pipeline row (default 2 S)"""
    schedules: tuple[Literal["gpipe", "1f1b", "interleaved"], ...] = SCHEDULES
    """LM only: pipeline schedules planned, comma separated: gpipe, 1f1b, interleaved (2 chunks
    of layers per device)"""
    context: tuple[int, ...] | None = None
    """LM only: context sizes C, comma separated: the sequence split over C devices, ring
    attention (default 4,8 where they divide n, for windows of 32,768 tokens or more; 1: no
    context rows)"""
    devices: tuple[int, ...] = (8,)
    """device counts, comma separated (e.g. 8,16,32)"""
    memory_gib: float = DEFAULT_MEMORY_GIB
    """memory budget per device, GiB"""
    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    """network bandwidth per device per direction, Gbit/s"""
    latency_us: float = DEFAULT_LATENCY_US
    """latency (alpha) of one ring step, microseconds"""
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    """assumed peak compute per device, TFLOP/s (a stated assumption)"""
    global_batch: int = DEFAULT_GLOBAL_BATCH
    """examples per step, all devices together"""
    strategies: tuple[str, ...] | None = None
    """model-parallel strategies, comma separated: dp, zero1, fsdp, tp, sp, fsdp_tp (default: all;
    the ViT: all but sp, which is tp for a model without activation names)"""
    optimizer: str = "adam"
    """optimizer whose state is planned: sgd, momentum, nesterov, adam, adamw, rmsprop"""

    @property
    def sizes(self) -> tuple[str, ...]:
        """The sizes of `model` (the flag named after it)."""
        return tuple(s.strip() for s in getattr(self, f"{self.model}_size") if s.strip())

    @property
    def overrides(self) -> dict[str, Any]:
        """The LM config fields the flags replace."""
        return {k: getattr(self, k) for k in ("remat", "seq_len") if getattr(self, k) is not None}

    @property
    def assumptions(self) -> Assumptions:
        return Assumptions(peak_tflops=self.peak_tflops, latency_us=self.latency_us,
                           bandwidth_gbps=self.bandwidth_gbps)


def get_config(variant: str = "") -> PlanConfig:
    """The defaults; the planner has no named variants."""
    if variant:
        raise ValueError(f"the planner has no config variants, got --config {variant}")
    return PlanConfig()


def plan_options(cfg: PlanConfig) -> dict[str, Any]:
    """`plan`'s and `validate_inputs`' arguments from the flags; UsageError for LM-only flags
    given to another model."""
    given = [f"--{k}" for k in LM_ONLY if getattr(cfg, k) is not None]
    if get_model(cfg.model).task != "language_modeling" and given:
        raise UsageError(f"{', '.join(given)}: options of the language models (--model lm or "
                         f"llama), not --model {cfg.model}")
    strategies = (DEFAULT_STRATEGIES[cfg.model] if cfg.strategies is None
                  else tuple(s.strip() for s in cfg.strategies if s.strip()))
    return dict(model=cfg.model, sizes=cfg.sizes, device_counts=cfg.devices,
                strategies=strategies, memory_gib=cfg.memory_gib, global_batch=cfg.global_batch,
                optimizer=cfg.optimizer, assumptions=cfg.assumptions, overrides=cfg.overrides,
                pipeline_stages=cfg.pipeline_stages, schedules=cfg.schedules,
                pipeline_microbatches=cfg.pipeline_microbatches, context=cfg.context)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Parses the flags, plans, prints the plan to `out` (default stdout); the exit status: 0, or
    2 for bad input (one line on stderr)."""
    from jaxdist.config import parse_config

    out = out or sys.stdout
    try:
        cfg = parse_config(get_config, argv, description=DESCRIPTION)
    except SystemExit as e:  # --help (0), or a bad flag already reported in one line (2)
        return int(e.code or 0)
    try:
        options = plan_options(cfg)
        validate_inputs(**options)
        from jaxdist.cluster import configure_cpu_devices

        configure_cpu_devices(max(cfg.devices))  # before anything asks JAX for devices
        rows = plan(**options)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_plan(rows, memory_gib=cfg.memory_gib, global_batch=cfg.global_batch,
                      optimizer=cfg.optimizer, assumptions=cfg.assumptions), file=out)
    return 0
