"""How long a checkpoint save blocks training, asynchronous vs synchronous, for a large state.

    python -m benchmarks.checkpoint                       # 102M parameters + Adam state
    python -m benchmarks.checkpoint --width 1024 --rounds 2   # a quick small run

"Blocking" is the time `Checkpointer.save` holds the training loop: for an asynchronous save,
copying device arrays to host memory; for a synchronous one, the whole write. "Total" runs until
the files are committed. Each round writes a new step into a fresh directory under --dir.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    width: int = 3200
    """MLP width"""
    layers: int = 10
    """MLP layers"""
    rounds: int = 3
    """saves per mode (the median is reported)"""
    dir: str | None = None
    """where to write (None: a temporary directory, removed after)"""


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
    return {"blocking": harness.Rounds(tuple(blocking)).median,
            "total": harness.Rounds(tuple(total)).median}


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    if min(args.width, args.layers, args.rounds) < 1:
        return harness.fail("--width, --layers and --rounds must be >= 1")

    import jax

    from jaxdist.cluster import configure_cpu_devices

    configure_cpu_devices(1)
    state = jax.block_until_ready(build_state(args.width, args.layers))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    gigabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
    report = harness.Report(args)
    report.say(f"state: {params / 1e6:.1f}M parameters, {gigabytes:.2f} GB with Adam state, "
               f"{jax.devices()[0].platform}, medians of {args.rounds} saves per mode\n")
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
    report.table(["mode", "blocking s", "total s", "GB/s"],
                 [(mode, f"{blocking:.2f}", f"{total:.2f}", f"{rate:.2f}")
                  for mode, blocking, total, rate in rows])
    report.say(f"\nasync blocks {rows[1][1] / max(rows[0][1], 1e-9):.1f}x less than sync")
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
