"""Images/s of the data-parallel CNN step as one process or several, on this machine.

    python -m benchmarks.multiprocess                              # 1x2, 2x1, 1x8, 2x4
    python -m benchmarks.multiprocess --layouts 2x1 --strategies jit,shard_map --rounds 5

A layout PxD is P processes (`jaxdist.launch`, gloo over loopback) of D virtual CPU devices each,
training the classic CNN with `Trainer` (each of `--strategies`, SGD momentum) on random
uint8 batches (each process makes only its rows of the global batch). Every layout runs in fresh
processes, rounds alternate the layouts, and the medians are printed with the machine they ran
on. With a PyTorch (`--torch_python`, as for `benchmarks.vs_torch`), each round also runs
PyTorch DDP with P gloo processes for each P of the layouts (`benchmarks/torch_reference.py`,
the same CNN, batch and optimizer, cores / P threads per process), for the same comparison over
the same transport.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from benchmarks import harness

RESULT = "benchmarks.multiprocess result: "


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    layouts: tuple[str, ...] = ("1x2", "2x1", "1x8", "2x4")
    """PxD layouts, comma-separated: P processes of D devices each"""
    strategies: tuple[str, ...] = ("jit", "shard_map")
    """data-parallel strategies, comma-separated"""
    global_batch: int = 512
    """images per step, over all processes"""
    steps: int = 40
    """timed steps per run"""
    warmup: int = 5
    """untimed steps before them"""
    rounds: int = 3
    """alternating rounds (the median is shown)"""
    torch_python: str | None = None
    """an interpreter with torch: adds PyTorch DDP rows (None: $JAXDIST_TORCH_PYTHON, else this
    one if it has torch; 'none': no PyTorch rows)"""


def worker(strategy: str, global_batch: int, steps: int, warmup: int) -> None:
    """One process of a layout: times `steps` steps and (process 0) prints the result line."""
    from jaxdist.cluster import configure_cpu_devices, initialize

    configure_cpu_devices()
    initialize()
    import jax
    import numpy as np
    import optax

    from jaxdist import Trainer
    from jaxdist.models import get_model

    cnn = get_model("cnn").variant()
    rng = np.random.default_rng(jax.process_index())
    batches = [cnn.random_batch(global_batch // jax.process_count(), rng) for _ in range(8)]
    dp = Trainer(cnn.build(seed=0), optax.sgd(0.01, momentum=0.9), cnn.loss_fn, strategy=strategy)
    seconds = harness.step_seconds(dp, dp.init(), batches, steps=steps, warmup=warmup)[0].median
    if jax.process_index() == 0:
        print(RESULT + json.dumps({"images_per_second": global_batch / seconds,
                                   "devices": jax.device_count(),
                                   "processes": jax.process_count()}), flush=True)


def run_layout(processes: int, devices: int, strategy: str, args) -> float:
    """Images/s of one run of layout `processes` x `devices` in fresh processes."""
    call = f"worker({strategy!r}, {args.global_batch}, {args.steps}, {args.warmup})"
    command = [sys.executable, "-c", f"from benchmarks.multiprocess import worker; {call}"]
    if processes > 1:
        command = [sys.executable, "-m", "jaxdist.launch", "-n", str(processes),
                   "--devices_per_process", str(devices), "--", *command]
    env = {**os.environ, "JAXDIST_CPU_DEVICES": str(devices)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    lines = [line.split(RESULT, 1)[1] for line in proc.stdout.splitlines() if RESULT in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"{strategy} on {processes}x{devices} failed (exit {proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-800:]}")
    return json.loads(lines[-1])["images_per_second"]


def _layouts(items: tuple[str, ...]) -> list[tuple[int, int]]:
    """[(P, D)] of "PxD" items.

    Raises:
        UsageError: an item that is not PxD with P, D >= 1.
    """
    from jaxdist.errors import UsageError

    out = []
    for item in items:
        try:
            p, d = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"layout {item!r} is not PxD (e.g. 2x4)") from None
        if p < 1 or d < 1:
            raise UsageError(f"layout {item!r} needs at least 1 process and 1 device")
        out.append((p, d))
    return out


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    from jaxdist import STRATEGIES

    layouts = _layouts(args.layouts)
    data_parallel = [name for name, s in STRATEGIES.items() if s.parallelism == "data"]
    unknown = [s for s in args.strategies if s not in data_parallel]
    if unknown:
        return harness.fail(f"unknown strategy {unknown[0]!r}; choose from "
                            f"{', '.join(data_parallel)}")
    for p, d in layouts:
        if args.global_batch % (p * d):
            return harness.fail(f"global batch {args.global_batch} does not split over {p}x{d} "
                                f"devices")
    from benchmarks.vs_torch import run_torch, torch_python, torch_version

    python = None if args.torch_python == "none" else torch_python(args.torch_python)
    report = harness.Report(args, **torch_version(python))
    report.say(f"classic CNN, Trainer ({', '.join(args.strategies)}), global batch "
               f"{args.global_batch}, SGD momentum, random uint8 batches, {args.steps} steps x "
               f"{args.rounds} alternating rounds, img/s\n")
    measures = {(p, d, strategy): (lambda p=p, d=d, s=strategy: run_layout(p, d, s, args))
                for p, d in layouts for strategy in args.strategies}
    for p in sorted({p for p, _ in layouts}) if python else ():
        measures[p, 1, "torch DDP"] = lambda p=p: run_torch(
            python, processes=p, global_batch=args.global_batch, steps=args.steps,
            warmup=args.warmup)
    results = harness.alternate(measures, args.rounds, unit=" img/s",
                                label=lambda key: f"{key[2]} {key[0]}x{key[1]}")
    report.table(["strategy", "processes x devices", "img/s (median)", "rounds"],
                 [(strategy, f"{p} x {d}", f"{r.median:,.0f}", r.spread())
                  for (p, d, strategy), r in results.items()])
    report.save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
