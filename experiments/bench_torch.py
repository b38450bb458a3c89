"""jaxdist vs PyTorch on the same machine: the classic CNN, same global batch and optimizer.

    python -m experiments.bench_torch --torch_python /path/to/python-with-torch
    python -m experiments.bench_torch --rounds 3 --steps 60 --processes 2

PyTorch runs `experiments/torch_reference.py` under `--torch_python` (default:
$JAXDIST_TORCH_PYTHON, else this interpreter when it has torch; `pip install jaxdist[bench]`).
Rounds alternate the frameworks and medians are printed. Two workloads:
- step: random uint8 batches already in memory (compute and gradient all-reduce only);
- end-to-end: real MNIST through each framework's usual input path (jaxdist: grain batches from
  the TFDS data source, sharded onto the devices; PyTorch: a DataLoader with a
  DistributedSampler over the same decoded arrays).
Both use SGD with momentum 0.9, lr 0.01. PyTorch runs three ways: eager in 1 process, DDP with
`--processes` gloo processes sharing the cores, and `torch.compile` (Inductor) in 1 process; the
last column divides jaxdist by the best of them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from jaxdist.config import ArgumentParser

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


def torch_version(python: str | None) -> dict[str, str]:
    """{"torch": version} of the interpreter `python` (empty without one), for the header line
    every benchmark prints with its table (`jaxdist.observe.machine.describe_machine`)."""
    if not python:
        return {}
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return {"torch": out.stdout.strip() or "?"}


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtypes(text: str) -> list[str] | None:
    """The comma-separated jaxdist compute dtypes of a benchmark's --compute_dtypes (bfloat16:
    bf16 compute, float32 master weights), or None (after saying why) when one is unknown."""
    dtypes = text.split(",")
    if any(d not in COMPUTE_DTYPES for d in dtypes):
        print(f"error: --compute_dtypes takes float32 and/or bfloat16, got {text!r}",
              file=sys.stderr)
        return None
    return dtypes


# the PyTorch variants compared: (name, processes (None: --processes), torch.compile)
TORCH_VARIANTS = (("eager, 1 proc", 1, False), ("DDP", None, False),
                  ("torch.compile, 1 proc", 1, True))


def run_torch(python: str, *, processes: int, global_batch: int, steps: int,
              data: str = "random", compile: bool = False, warmup: int | None = None) -> float:
    """Images/s of `experiments/torch_reference.py` (DDP over gloo when `processes` > 1)."""
    command = [python, str(REFERENCE), "--processes", str(processes), "--global_batch",
               str(global_batch), "--steps", str(steps), "--data", data]
    command += (["--compile"] if compile else []) + (
        ["--warmup", str(warmup)] if warmup is not None else [])
    for attempt in (1, 2):  # gloo's rendezvous port can be taken between choosing and binding it
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_second"]
        print(f"  (PyTorch attempt {attempt} failed: "
              f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]})", flush=True)
    raise RuntimeError(f"the PyTorch reference failed: {proc.stderr.strip()[-500:]}")


def jax_runner(args, end_to_end: bool, train_split, compute_dtype: str = "float32"):
    """A function timing `args.steps` jaxdist steps (the program compiled beforehand)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from experiments.mnist import loss_fn
    from jaxdist import DataParallel
    from jaxdist.data import train_batches
    from jaxdist.models import MnistCNN

    dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)  # fp32 master weights
    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0), dtype=dtype), optax.sgd(0.01, momentum=0.9),
                      loss_fn, strategy=args.strategy, devices=args.devices or None,
                      microbatches=args.microbatches)
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
    parser = ArgumentParser(prog="python -m experiments.bench_torch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", default=None, help="interpreter that has torch")
    parser.add_argument("--processes", type=int, default=2, help="PyTorch DDP processes")
    parser.add_argument("--strategy", default="jit", help="jaxdist data-parallel strategy")
    parser.add_argument("--devices", type=int, default=0, help="jaxdist devices (0: all)")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--microbatches", type=int, default=1,
                        help="jaxdist gradient accumulation: each device's rows in this many "
                             "parts (the same update; on CPU smaller parts stay in cache)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compute_dtypes", default="float32",
                        help="jaxdist compute dtypes, comma-separated: float32, bfloat16 (fp32 "
                             "master weights); one jaxdist column each")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (end-to-end rows)")
    args = parser.parse_args(argv)
    dtypes = compute_dtypes(args.compute_dtypes)
    if dtypes is None:
        return 2
    if args.microbatches < 1 or args.global_batch % args.microbatches:
        print(f"error: --microbatches {args.microbatches} does not split the global batch "
              f"{args.global_batch}", file=sys.stderr)
        return 2
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
    variants = [(f"DDP, {args.processes} procs" if p is None else name, p, c)
                for name, p, c in TORCH_VARIANTS]
    rows = []
    for name, end_to_end in (("step", False), ("end-to-end", True)):
        try:
            run_jax = {d: jax_runner(args, end_to_end, train, d) for d in dtypes}
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        data = str(cache) if end_to_end else "random"
        jax_ips, torch_ips = {d: [] for d in dtypes}, {v[0]: [] for v in variants}
        for _ in range(args.rounds):
            for label, processes, compile in variants:
                torch_ips[label].append(run_torch(
                    python, processes=processes or args.processes, global_batch=args.global_batch,
                    steps=args.steps, data=data, compile=compile))
            for d in dtypes:
                jax_ips[d].append(run_jax[d]())
        rows.append((name, {d: statistics.median(v) for d, v in jax_ips.items()},
                     {k: statistics.median(v) for k, v in torch_ips.items()}))
        print(f"  {name}: " + ", ".join(f"jaxdist {d} {[round(x) for x in v]}"
                                        for d, v in jax_ips.items()) + ", " + ", ".join(
            f"PyTorch {k} {[round(x) for x in v]}" for k, v in torch_ips.items()), flush=True)
    from jaxdist.observe.machine import describe_machine

    print(f"# {describe_machine(**torch_version(python))}")
    accumulation = f" in {args.microbatches} microbatches" if args.microbatches > 1 else ""
    print(f"# jaxdist {args.strategy} on {args.devices or 'all'} devices; global batch "
          f"{args.global_batch}{accumulation}, SGD momentum; medians of {args.rounds} "
          f"alternating rounds (img/s)")
    labels = [v[0] for v in variants]
    short = {"float32": "fp32", "bfloat16": "bf16 compute"}
    print("| workload | " + " | ".join(f"jaxdist {short[d]}" for d in dtypes) + " | "
          + " | ".join(f"PyTorch {k}" for k in labels) + " | "
          + " | ".join(f"jaxdist {short[d]} / best PyTorch" for d in dtypes) + " |")
    print("|---" * (len(labels) + 2 * len(dtypes) + 1) + "|")
    for name, jax_ips, torch_ips in rows:
        best = max(torch_ips.values())
        print(f"| {name} | " + " | ".join(f"{jax_ips[d]:,.0f}" for d in dtypes) + " | "
              + " | ".join(f"{torch_ips[k]:,.0f}" for k in labels) + " | "
              + " | ".join(f"{jax_ips[d] / best:.2f}" for d in dtypes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
