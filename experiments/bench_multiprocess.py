"""Images/s of the data-parallel CNN step as one process or several, on this machine.

    python -m experiments.bench_multiprocess                         # 1x2, 2x1, 1x8, 2x4
    python -m experiments.bench_multiprocess --layouts 2x1 --strategies jit,shard_map --rounds 5

A layout PxD is P processes (`jaxdist.launch`, gloo over loopback) of D virtual CPU devices each,
training the classic CNN with `DataParallel` (each of `--strategies`, SGD momentum) on random
uint8 batches (each process makes only its rows of the global batch). Every layout runs in fresh
processes, rounds alternate the layouts, and the medians are printed with the machine they ran
on. With a PyTorch (`--torch_python`, as for `experiments.bench_torch`), each round also runs
PyTorch DDP with P gloo processes for each P of the layouts (`experiments/torch_reference.py`,
the same CNN, batch and optimizer, cores / P threads per process), for the same comparison over
the same transport.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from jaxdist.config import ArgumentParser

RESULT = "bench_multiprocess result: "


def worker(strategy: str, global_batch: int, steps: int, warmup: int) -> None:
    """One process of a layout: times `steps` steps and (process 0) prints the result line."""
    from jaxdist.cluster import configure_cpu_devices, initialize

    configure_cpu_devices()
    initialize()
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jaxdist import DataParallel
    from jaxdist.models import MnistCNN
    from jaxdist.models.classification import mnist_loss

    rows = global_batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    batches = [(rng.integers(0, 256, (rows, 28, 28, 1), dtype=np.uint8),
                rng.integers(0, 10, rows).astype(np.int32)) for _ in range(8)]
    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.01, momentum=0.9), mnist_loss,
                      strategy=strategy)
    state = dp.init()
    for k in range(warmup):
        state, metrics = dp.step(state, batches[k % len(batches)])
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for k in range(steps):
        state, metrics = dp.step(state, batches[k % len(batches)])
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        print(RESULT + json.dumps({"images_per_second": global_batch * steps / seconds,
                                   "devices": jax.device_count(),
                                   "processes": jax.process_count()}), flush=True)


def run_layout(processes: int, devices: int, strategy: str, args) -> float:
    """Images/s of one run of layout `processes` x `devices` in fresh processes."""
    command = [sys.executable, "-m", "experiments.bench_multiprocess", "--worker", strategy,
               "--global_batch", str(args.global_batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
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


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            p, d = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: layout {item!r} is not PxD (e.g. 2x4)") from None
        if p < 1 or d < 1:
            raise SystemExit(f"error: layout {item!r} needs at least 1 process and 1 device")
        out.append((p, d))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.bench_multiprocess",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1x2,2x1,1x8,2x4",
                        help="comma-separated PxD: P processes of D devices each")
    parser.add_argument("--strategies", default="jit,shard_map",
                        help="comma-separated data-parallel strategies")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median shown)")
    parser.add_argument("--torch_python", default=None,
                        help="an interpreter with torch: adds PyTorch DDP rows (default: "
                             "$JAXDIST_TORCH_PYTHON, else this one if it has torch; 'none': skip)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.global_batch, args.steps, args.warmup)
        return 0
    from jaxdist.parallel.strategies import DATA_PARALLEL_STRATEGIES

    try:
        layouts = _layouts(args.layouts)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in DATA_PARALLEL_STRATEGIES]
    if unknown:
        print(f"error: unknown strategy {unknown[0]!r}; choose from "
              f"{', '.join(DATA_PARALLEL_STRATEGIES)}", file=sys.stderr)
        return 2
    for p, d in layouts:
        if args.global_batch % (p * d):
            print(f"error: global batch {args.global_batch} does not split over {p}x{d} devices",
                  file=sys.stderr)
            return 2
    from experiments.bench_torch import run_torch, torch_python, torch_version
    from jaxdist.observe.machine import describe_machine

    python = None if args.torch_python == "none" else torch_python(args.torch_python)
    print(f"# {describe_machine(**torch_version(python))}")
    print(f"# classic CNN, DataParallel ({', '.join(strategies)}), global batch "
          f"{args.global_batch}, SGD momentum, random uint8 batches, {args.steps} steps x "
          f"{args.rounds} alternating rounds", flush=True)
    results: dict[tuple[int, int, str], list[float]] = {}
    for r in range(args.rounds):
        for p, d in layouts:
            for strategy in strategies:
                ips = run_layout(p, d, strategy, args)
                results.setdefault((p, d, strategy), []).append(ips)
                print(f"  round {r + 1}: {strategy} {p}x{d}: {ips:,.0f} img/s", flush=True)
        for p in sorted({p for p, _ in layouts}) if python else ():
            ips = run_torch(python, processes=p, global_batch=args.global_batch,
                            steps=args.steps, warmup=args.warmup)
            results.setdefault((p, 1, "torch DDP"), []).append(ips)
            print(f"  round {r + 1}: torch DDP {p}x1: {ips:,.0f} img/s", flush=True)
    print("| strategy | processes x devices | img/s (median) | rounds |")
    print("|---|---|---|---|")
    for (p, d, strategy), values in results.items():
        print(f"| {strategy} | {p} x {d} | {statistics.median(values):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
