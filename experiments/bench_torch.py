"""jaxdist vs PyTorch DDP on the same machine: the classic CNN, same global batch and optimizer.

    python -m experiments.bench_torch --torch_python /path/to/python-with-torch
    python -m experiments.bench_torch --rounds 3 --steps 60 --processes 2

PyTorch runs `experiments/torch_reference.py` under `--torch_python` (default:
$JAXDIST_TORCH_PYTHON, else this interpreter when it has torch; `pip install jaxdist[bench]`).
Rounds alternate the frameworks and medians are printed. Two workloads:
- step: random uint8 batches already in memory (compute and gradient all-reduce only);
- end-to-end: real MNIST through each framework's usual input path (jaxdist: grain batches from
  the TFDS data source, sharded onto the devices; PyTorch: a DataLoader with a
  DistributedSampler over the same decoded arrays).
Both use SGD with momentum 0.9, lr 0.01, and `--processes` DDP processes sharing the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = Path(__file__).with_name("torch_reference.py")


def torch_python(explicit: str | None) -> str | None:
    candidate = explicit or os.environ.get("JAXDIST_TORCH_PYTHON")
    if candidate:
        return candidate
    try:
        import torch  # noqa: F401

        return sys.executable
    except ImportError:
        return None


def run_torch(python: str, args, data: str) -> float:
    proc = subprocess.run(
        [python, str(REFERENCE), "--processes", str(args.processes), "--global_batch",
         str(args.global_batch), "--steps", str(args.steps), "--data", data],
        capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the PyTorch reference failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_second"]


def jax_runner(args, end_to_end: bool, train_split):
    """A function timing `args.steps` jaxdist steps (the program compiled beforehand)."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from experiments.mnist import loss_fn
    from jaxdist import DataParallel
    from jaxdist.data import train_batches
    from jaxdist.models import MnistCNN

    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.01, momentum=0.9), loss_fn,
                      strategy=args.strategy, devices=args.devices or None)
    state = dp.init()
    rng = np.random.default_rng(0)
    pool = [(rng.integers(0, 256, (args.global_batch, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, args.global_batch).astype(np.int32)) for _ in range(8)]
    state, _ = dp.step(state, pool[0])
    jax.block_until_ready(state)
    start_step = [0]

    def run() -> float:
        nonlocal state
        if end_to_end:
            batches = train_batches(train_split, args.global_batch, 0,
                                    start_step=start_step[0])
            start_step[0] += args.steps
        t0 = time.perf_counter()
        for i in range(args.steps):
            batch = next(batches) if end_to_end else pool[i % len(pool)]
            state, metrics = dp.step(state, batch)
        jax.block_until_ready((state, metrics))
        return args.steps * args.global_batch / (time.perf_counter() - t0)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_torch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", default=None, help="interpreter that has torch")
    parser.add_argument("--processes", type=int, default=2, help="PyTorch DDP processes")
    parser.add_argument("--strategy", default="jit", help="jaxdist data-parallel strategy")
    parser.add_argument("--devices", type=int, default=0, help="jaxdist devices (0: all)")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (end-to-end rows)")
    args = parser.parse_args(argv)
    python = torch_python(args.torch_python)
    if python is None:
        print("error: no PyTorch found; pip install 'jaxdist[bench]' or pass --torch_python "
              "(or set JAXDIST_TORCH_PYTHON) to an interpreter that has torch", file=sys.stderr)
        return 2

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices()
    from experiments.mnist import DATA_FALLBACKS
    from jaxdist.data import load_split
    from jaxdist.errors import UsageError

    try:
        train = load_split("mnist", "train", args.data_dir, progress=False,
                           fallbacks=DATA_FALLBACKS)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "jaxdist-bench-mnist-train.npz"
    if not cache.exists():
        import numpy as np

        np.savez(cache, images=train.images, labels=train.labels)
    rows = []
    for name, end_to_end in (("step", False), ("end-to-end", True)):
        run_jax = jax_runner(args, end_to_end, train)
        jax_ips, torch_ips = [], []
        for _ in range(args.rounds):
            torch_ips.append(run_torch(python, args, str(cache) if end_to_end else "random"))
            jax_ips.append(run_jax())
        rows.append((name, statistics.median(jax_ips), statistics.median(torch_ips)))
        print(f"  {name}: jaxdist {[round(x) for x in jax_ips]}, "
              f"torch {[round(x) for x in torch_ips]}", flush=True)
    print(f"{'workload':<11} | {'jaxdist img/s':>13} | {'torch DDP img/s':>15} | ratio")
    for name, jax_ips, torch_ips in rows:
        print(f"{name:<11} | {jax_ips:>13,.0f} | {torch_ips:>15,.0f} | {jax_ips / torch_ips:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
