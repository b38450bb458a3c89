"""How long a checkpoint save blocks training, asynchronous vs synchronous, for a large state.

    python -m experiments.bench_checkpoint                    # 102M parameters + Adam state
    python -m experiments.bench_checkpoint --width 1024 --rounds 2   # a quick small run

"Blocking" is the time `Checkpointer.save` holds the training loop: for an asynchronous save,
copying device arrays to host memory; for a synchronous one, the whole write. "Total" runs until
the files are committed. Each round writes a new step into a fresh directory under --dir.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from jaxdist.config import ArgumentParser


def build_state(width: int, layers: int):
    """A TrainState of an MLP with `layers` width x width layers, Adam state included."""
    import optax
    from flax import nnx

    from jaxdist.core.step import init_state

    model = nnx.Sequential(*[nnx.Linear(width, width, rngs=nnx.Rngs(i)) for i in range(layers)])
    _, state = init_state(model, optax.adam(1e-3))
    return state


def measure(state, directory: Path, asynchronous: bool, rounds: int) -> dict:
    from jaxdist.io import Checkpointer

    ckpt = Checkpointer(directory, every=1, keep=1, asynchronous=asynchronous)
    blocking, total = [], []
    for step in range(1, rounds + 1):
        t0 = time.perf_counter()
        ckpt.save(step, state)
        blocking.append(time.perf_counter() - t0)
        ckpt.wait()
        total.append(time.perf_counter() - t0)
    ckpt.close()
    return {"blocking": statistics.median(blocking), "total": statistics.median(total)}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=3200, help="MLP width")
    parser.add_argument("--layers", type=int, default=10, help="MLP layers")
    parser.add_argument("--rounds", type=int, default=3, help="saves per mode (median reported)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    if min(args.width, args.layers, args.rounds) < 1:
        parser.error("width, layers and rounds must be >= 1")

    import jax

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(1)
    state = jax.block_until_ready(build_state(args.width, args.layers))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    gigabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
    print(f"state: {params / 1e6:.1f}M parameters, {gigabytes:.2f} GB with Adam state, "
          f"{jax.devices()[0].platform}, {args.rounds} saves per mode", flush=True)
    root = Path(args.dir or tempfile.mkdtemp(prefix="jaxdist-bench-ckpt-"))
    rows = []
    try:
        for mode, asynchronous in (("async", True), ("sync", False)):
            r = measure(state, root / mode, asynchronous, args.rounds)
            rows.append((mode, r["blocking"], r["total"], gigabytes / r["total"]))
            shutil.rmtree(root / mode, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'mode':<6} | {'blocking s':>10} | {'total s':>8} | {'GB/s':>5}")
    for mode, blocking, total, rate in rows:
        print(f"{mode:<6} | {blocking:>10.2f} | {total:>8.2f} | {rate:>5.2f}")
    print(f"async blocks {rows[1][1] / max(rows[0][1], 1e-9):.1f}x less than sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
