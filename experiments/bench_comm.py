"""Communication options side by side: bytes per step, images/s and MNIST accuracy.

    python -m experiments.bench_comm                      # every option, 3 epochs each
    python -m experiments.bench_comm --epochs 1 --options fp32,int8,topk

Each option trains the classic CNN with the experiment's recipe (Adam one-cycle, global batch 128)
on 8 devices for the same number of epochs, then its compiled train step is read for the bytes
its collectives move per device (ring wire bytes, `jaxdist.observe.collective_ledger`). Local SGD
and DiLoCo all-reduce on one step in H, so their bytes are the ledger's divided by H. The ratio
is to the fp32 all-reduce of plain data parallelism (`shard_map` + `lax.pmean`).
"""

from __future__ import annotations

import dataclasses
import sys
from jaxdist.config import ArgumentParser

# name -> (description, config overrides)
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
    import numpy as np

    from jaxdist.observe import collective_ledger
    from jaxdist.observe.metrics import compiled_step

    batch = (np.zeros((cfg.global_batch, 28, 28, 1), np.uint8),
             np.zeros((cfg.global_batch,), np.int32))
    hlo = compiled_step(dp, dp.init(), dp.shard_batch(batch)).as_text()
    wire = collective_ledger(hlo, dp.num_devices).total(wire=True)
    return wire / cfg.local_steps if cfg.strategy == "local_sgd" else wire


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.bench_comm",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"comma-separated, from: {', '.join(OPTIONS)}")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--data_dir", default=None, help="TFDS data dir")
    args = parser.parse_args(argv)
    chosen = args.options.split(",")
    unknown = [o for o in chosen if o not in OPTIONS]
    if unknown:
        print(f"error: unknown option(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}",
              file=sys.stderr)
        return 2
    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(8)
    from experiments.mnist import get_config, train
    from jaxdist.errors import UsageError

    base = dataclasses.replace(get_config(), epochs=args.epochs, data_dir=args.data_dir,
                               progress=False, compile_cache="off")
    rows = []
    for name in chosen:
        label, overrides = OPTIONS[name]
        cfg = dataclasses.replace(base, **overrides)
        print(f"[{len(rows) + 1}/{len(chosen)}] {label}", file=sys.stderr, flush=True)
        try:
            summary = train(cfg)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append((name, label, step_wire_bytes(summary["dp"], cfg),
                     summary["images_per_second"], summary["test_accuracy"]))
    reference = next((r for r in rows if r[0] == "fp32"), rows[0])
    print(f"\n{args.epochs:g} epochs each, global batch {base.global_batch}, 8 devices; bytes are "
          f"ring wire bytes per device per step; ratio = {reference[1]} / option")
    print(f"{'option':<36} | {'KiB/step':>9} | {'fewer':>7} | {'img/s':>6} | {'accuracy':>8} | "
          f"{'vs ' + reference[0]:>8}")
    for name, label, wire, ips, acc in rows:
        print(f"{label:<36} | {wire / 1024:>9.2f} | {reference[2] / wire:>6.1f}x | {ips:>6,.0f} | "
              f"{100 * acc:>7.2f}% | {100 * (acc - reference[4]):>+7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
