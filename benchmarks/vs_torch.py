"""jaxdist vs PyTorch on the same machine: the classic CNN, same global batch and optimizer.

    python -m benchmarks.vs_torch --torch_python /path/to/python-with-torch
    python -m benchmarks.vs_torch --rounds 3 --steps 60 --processes 2

PyTorch runs `benchmarks/torch_reference.py` under `--torch_python` (default:
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

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from benchmarks import harness

REFERENCE = Path(__file__).with_name("torch_reference.py")
ComputeDtype = Literal["float32", "bfloat16"]
"""jaxdist's compute dtype; bfloat16 keeps float32 master weights."""


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    torch_python: str | None = None
    """interpreter that has torch (None: $JAXDIST_TORCH_PYTHON, else this one if it has torch)"""
    processes: int = 2
    """PyTorch DDP processes"""
    strategy: str = "jit"
    """jaxdist data-parallel strategy"""
    devices: int = 0
    """jaxdist devices (0: all)"""
    global_batch: int = 512
    """images per step"""
    microbatches: int = 1
    """jaxdist gradient accumulation: each device's rows in this many parts (the same update;
    on CPU smaller parts stay in cache)"""
    steps: int = 40
    """timed steps per round"""
    rounds: int = 3
    """alternating rounds (the median is shown)"""
    compute_dtypes: tuple[ComputeDtype, ...] = ("float32",)
    """jaxdist compute dtypes, comma-separated (bfloat16: fp32 master weights); a column each"""
    data_dir: str | None = None
    """TFDS data dir (end-to-end rows)"""


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
    """{"torch": version} of the interpreter `python` (empty without one), for the machine line
    every benchmark prints with its table (`harness.Report(cfg, **torch_version(python))`)."""
    if not python:
        return {}
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return {"torch": out.stdout.strip() or "?"}


# the PyTorch variants compared: (name, processes (None: --processes), torch.compile)
TORCH_VARIANTS = (("eager, 1 proc", 1, False), ("DDP", None, False),
                  ("torch.compile, 1 proc", 1, True))


def run_torch(python: str, *, processes: int, global_batch: int, steps: int,
              data: str = "random", compile: bool = False, warmup: int | None = None) -> float:
    """Images/s of `benchmarks/torch_reference.py` (DDP over gloo when `processes` > 1)."""
    command = [python, str(REFERENCE), "--processes", str(processes), "--global_batch",
               str(global_batch), "--steps", str(steps), "--data", data]
    command += (["--compile"] if compile else []) + (
        ["--warmup", str(warmup)] if warmup is not None else [])
    for attempt in (1, 2):  # gloo's rendezvous port can be taken between choosing and binding it
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_second"]
        harness.progress(f"  (PyTorch attempt {attempt} failed: "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]})")
    raise RuntimeError(f"the PyTorch reference failed: {proc.stderr.strip()[-500:]}")


def jax_runner(args, end_to_end: bool, train_split, compute_dtype: str = "float32"):
    """A function timing `args.steps` jaxdist steps (the program compiled beforehand)."""
    import jax
    import numpy as np
    import optax

    from jaxdist import Trainer
    from jaxdist.data.pipeline import train_batches
    from jaxdist.models import get_model

    cnn = get_model("cnn").variant(compute_dtype=compute_dtype)  # bf16: fp32 master weights
    dp = Trainer(cnn.build(seed=0), optax.sgd(0.01, momentum=0.9), cnn.loss_fn,
                 strategy=args.strategy, devices=args.devices or None,
                 microbatches=args.microbatches)
    state = dp.init()
    rng = np.random.default_rng(0)
    pool = [cnn.random_batch(args.global_batch, rng) for _ in range(8)]
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


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    dtypes = args.compute_dtypes
    if args.microbatches < 1 or args.global_batch % args.microbatches:
        return harness.fail(f"--microbatches {args.microbatches} does not split the global "
                            f"batch {args.global_batch}")
    python = torch_python(args.torch_python)
    if python is None:
        return harness.fail("no PyTorch found; pip install 'jaxdist[bench]' or pass "
                            "--torch_python (or set JAXDIST_TORCH_PYTHON) to an interpreter "
                            "that has torch")

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices()
    from experiments.mnist import DATA_FALLBACKS
    from jaxdist.data import load_split

    train = load_split("mnist", "train", args.data_dir, progress=False, fallbacks=DATA_FALLBACKS)
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "jaxdist-bench-mnist-train.npz"
    if not cache.exists():
        import numpy as np

        np.savez(cache, images=train.images, labels=train.labels)
    variants = [(f"DDP, {args.processes} procs" if p is None else name, p, c)
                for name, p, c in TORCH_VARIANTS]
    rows = []
    for name, end_to_end in (("step", False), ("end-to-end", True)):
        run_jax = {d: jax_runner(args, end_to_end, train, d) for d in dtypes}
        data = str(cache) if end_to_end else "random"
        harness.progress(f"{name}:")
        measures = {f"PyTorch {label}": (lambda p=processes, c=compile: run_torch(
            python, processes=p or args.processes, global_batch=args.global_batch,
            steps=args.steps, data=data, compile=c)) for label, processes, compile in variants}
        measures.update({f"jaxdist {d}": run_jax[d] for d in dtypes})
        rows.append((name, harness.alternate(measures, args.rounds, unit=" img/s")))
    report = harness.Report(args, **torch_version(python))
    accumulation = f" in {args.microbatches} microbatches" if args.microbatches > 1 else ""
    report.say(f"jaxdist {args.strategy} on {args.devices or 'all'} devices; global batch "
               f"{args.global_batch}{accumulation}, SGD momentum; medians of {args.rounds} "
               f"alternating rounds, img/s\n")
    labels = [v[0] for v in variants]
    short = {"float32": "fp32", "bfloat16": "bf16 compute"}
    table = []
    for name, ips in rows:
        best = max(ips[f"PyTorch {k}"].median for k in labels)
        table.append((name, *(f"{ips[f'jaxdist {d}'].median:,.0f}" for d in dtypes),
                      *(f"{ips[f'PyTorch {k}'].median:,.0f}" for k in labels),
                      *(f"{ips[f'jaxdist {d}'].median / best:.2f}" for d in dtypes)))
    report.table(["workload", *(f"jaxdist {short[d]}" for d in dtypes),
                  *(f"PyTorch {k}" for k in labels),
                  *(f"jaxdist {short[d]} / best PyTorch" for d in dtypes)], table)
    report.save()
    return 0

if __name__ == "__main__":
    sys.exit(main())
