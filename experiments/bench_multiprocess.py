"""Images/s of the data-parallel CNN step as one process or several, on this machine.

    python -m experiments.bench_multiprocess                         # 1x2, 2x1, 1x8, 2x4
    python -m experiments.bench_multiprocess --layouts 2x1 --rounds 5 --threads 0,1

A layout PxD is P processes (`jaxdist.launch`, gloo over loopback) of D virtual CPU devices each,
training the classic CNN with `DataParallel` (jit, SGD momentum) on random uint8 batches (each
process makes only its rows of the global batch). Every layout runs in fresh processes, rounds
alternate the layouts, and the medians are printed with the machine they ran on.

`--threads` sets $JAXDIST_CPU_THREADS per run (0: jaxdist's default, which gives each of P
processes on one host cores / P threads; see `jaxdist.cluster.devices.cpu_threads`), so the
default can be compared with other choices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULT = "bench_multiprocess result: "


def worker(global_batch: int, steps: int, warmup: int) -> None:
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
                      strategy="jit")
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


def run_layout(processes: int, devices: int, threads: int, args) -> float:
    """Images/s of one run of layout `processes` x `devices` in fresh processes."""
    command = [sys.executable, "-m", "experiments.bench_multiprocess", "--worker",
               "--global_batch", str(args.global_batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    if processes > 1:
        command = [sys.executable, "-m", "jaxdist.launch", "-n", str(processes),
                   "--devices_per_process", str(devices), "--", *command]
    env = {**os.environ, "JAXDIST_CPU_DEVICES": str(devices)}
    env.pop("JAXDIST_CPU_THREADS", None)
    if threads:
        env["JAXDIST_CPU_THREADS"] = str(threads)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    lines = [line.split(RESULT, 1)[1] for line in proc.stdout.splitlines() if RESULT in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"layout {processes}x{devices} failed (exit {proc.returncode}): "
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
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_multiprocess",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="1x2,2x1,1x8,2x4",
                        help="comma-separated PxD: P processes of D devices each")
    parser.add_argument("--threads", default="0",
                        help="comma-separated $JAXDIST_CPU_THREADS values to compare (0: default)")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median shown)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.global_batch, args.steps, args.warmup)
        return 0
    try:
        layouts = _layouts(args.layouts)
        threads = [int(t) for t in args.threads.split(",")]
    except (SystemExit, ValueError) as e:
        print(e if isinstance(e, SystemExit) else f"error: --threads: {e}", file=sys.stderr)
        return 2
    for p, d in layouts:
        if args.global_batch % (p * d):
            print(f"error: global batch {args.global_batch} does not split over {p}x{d} devices",
                  file=sys.stderr)
            return 2
    from jaxdist.observe.machine import describe_machine

    print(f"# {describe_machine()}")
    print(f"# classic CNN, DataParallel jit, global batch {args.global_batch}, SGD momentum, "
          f"random uint8 batches, {args.steps} steps x {args.rounds} alternating rounds",
          flush=True)
    results: dict[tuple[int, int, int], list[float]] = {}
    for r in range(args.rounds):
        for p, d in layouts:
            for t in threads:
                ips = run_layout(p, d, t, args)
                results.setdefault((p, d, t), []).append(ips)
                print(f"  round {r + 1}: {p}x{d} threads={t or 'default'}: {ips:,.0f} img/s",
                      flush=True)
    print(f"| processes x devices | threads per process | img/s (median) | rounds |")
    print("|---|---|---|---|")
    for (p, d, t), values in results.items():
        print(f"| {p} x {d} | {t or 'default'} | {statistics.median(values):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
