"""`python -m jaxdist.plan`: the flags, checked before any compile, then the plan printed."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence, TextIO

import jaxdist.plan as _package
from jaxdist.errors import UsageError
from jaxdist.plan.cost import (DEFAULT_BANDWIDTH_GBPS, DEFAULT_LATENCY_US, DEFAULT_PEAK_TFLOPS,
                               Assumptions)
from jaxdist.plan.models import DEFAULT_LM_REMAT, MODELS
from jaxdist.plan.report import format_plan
from jaxdist.plan.search import (DEFAULT_GLOBAL_BATCH, DEFAULT_MEMORY_GIB, DEFAULT_STRATEGIES,
                                 PIPELINE_STAGES, SCHEDULES, STRATEGIES, plan, validate_inputs)

DEFAULT_SIZES = {"vit": "small", "lm": "125m"}


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
    p = _Parser(prog="python -m jaxdist.plan", description=_package.__doc__.split("\n\n")[0])
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


