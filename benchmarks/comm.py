"""Communication options side by side: bytes per step, images/s and MNIST accuracy.

    python -m benchmarks.comm                             # every option, 3 epochs each
    python -m benchmarks.comm --epochs 1 --options fp32,int8,topk

Each option trains the classic CNN with the experiment's recipe (Adam one-cycle, global batch 128)
on 8 devices for the same number of epochs, then its compiled train step is read for the bytes
its collectives move per device (ring wire bytes, `jaxdist.observe.collective_ledger`). Local SGD
and DiLoCo all-reduce on one step in H, so their bytes are the ledger's divided by H. The ratio
is to the fp32 all-reduce of plain data parallelism (`shard_map` + `lax.pmean`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from benchmarks import harness

Option = Literal["fp32", "bf16", "bf16_compute", "int8", "topk", "powersgd4", "powersgd1",
                 "local_sgd8", "diloco8", "stale4"]

# name (each of `Option`) -> (description, the experiment's flags it sets)
OPTIONS = {
    "fp32": ("fp32 all-reduce (shard_map)", {"strategy": "shard_map"}),
    "bf16": ("bf16 all-reduce", {"strategy": "shard_map", "grad_reduce": "bf16"}),
    "bf16_compute": ("bf16 compute, fp32 all-reduce",
                     {"strategy": "shard_map", "compute_dtype": "bfloat16"}),
    "int8": ("int8 all-reduce", {"strategy": "shard_map", "grad_reduce": "int8"}),
    "topk": ("top-1% + error feedback",
             {"strategy": "shard_map", "grad_reduce": "topk", "topk_fraction": 0.01}),
    "powersgd4": ("PowerSGD rank 4 + error feedback",
                  {"strategy": "shard_map", "grad_reduce": "powersgd", "powersgd_rank": 4}),
    "powersgd1": ("PowerSGD rank 1 + error feedback",
                  {"strategy": "shard_map", "grad_reduce": "powersgd", "powersgd_rank": 1}),
    "local_sgd8": ("local SGD, H = 8", {"strategy": "local_sgd", "local_steps": 8}),
    "diloco8": ("DiLoCo, H = 8 (outer Nesterov 0.7)",
                {"strategy": "local_sgd", "local_steps": 8, "outer_optimizer": "nesterov"}),
    "stale4": ("stale gradients, tau = 4", {"strategy": "shard_map", "staleness": 4}),
}


def step_wire_bytes(dp, cfg) -> float:
    """Ring wire bytes per device per step of the compiled train step."""
    from experiments.mnist import model_variant
    from jaxdist.observe import collective_ledger
    from jaxdist.observe.flops import compiled_step

    batch = model_variant(cfg).random_batch(cfg.global_batch)
    hlo = compiled_step(dp, dp.init(), dp.shard_batch(batch)).as_text()
    wire = collective_ledger(hlo, dp.num_devices).total(wire=True)
    parallel = cfg.parallel
    return wire / parallel.local_steps if parallel.strategy == "local_sgd" else wire


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    options: tuple[Option, ...] = tuple(OPTIONS)
    """communication options, comma-separated"""
    epochs: float = 3.0
    """epochs each option trains"""
    data_dir: str | None = None
    """TFDS data dir"""


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    chosen = args.options
    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(8)
    from experiments.mnist import get_config, train
    from jaxdist.config import replace_flags

    base = replace_flags(get_config(), epochs=args.epochs, data_dir=args.data_dir,
                         progress=False, compile_cache="off")
    rows = []
    for name in chosen:
        label, flags = OPTIONS[name]
        cfg = replace_flags(base, **flags)
        harness.progress(f"[{len(rows) + 1}/{len(chosen)}] {label}")
        summary = train(cfg)
        rows.append((name, label, step_wire_bytes(summary["dp"], cfg),
                     summary["images_per_second"], summary["test_accuracy"]))
    reference = next((r for r in rows if r[0] == "fp32"), rows[0])
    report = harness.Report(args)
    report.say(f"{args.epochs:g} epochs each, global batch {base.global_batch}, 8 devices; bytes "
               f"are ring wire bytes per device per step; fewer = {reference[1]} / option\n")
    report.table(
        ["option", "KiB/step", "fewer", "img/s", "accuracy", f"vs {reference[0]}"],
        [(label, f"{wire / 1024:.2f}", f"{reference[2] / wire:.1f}x", f"{ips:,.0f}",
          f"{100 * acc:.2f}%", f"{100 * (acc - reference[4]):+.2f}")
         for name, label, wire, ips, acc in rows])
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
