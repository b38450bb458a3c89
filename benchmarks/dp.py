"""Images/s of each data-parallel backend on 1, 2, 4, 8 devices, against a hand-written jit loop.

    python -m benchmarks.dp                             # global batch 512, all backends
    python -m benchmarks.dp --devices 8 --strategies jit --steps 100

Both sides train the MNIST CNN with the same optax optimizer on the same host batches (random
uint8 images, so the input pipeline is not measured) and pay the same host->device transfer per
step. The baseline is the minimal loop a JAX user would write: replicated state, batch sharded
over a 1-D mesh, `jax.jit(step, donate_argnums=0)`. Rounds alternate toolkit and baseline and the
medians are reported; ratio = toolkit / baseline (the toolkit's overhead is 1 - ratio).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from benchmarks import harness
from jaxdist.cluster import configure_cpu_devices


@dataclasses.dataclass(frozen=True)
class Config(harness.BenchConfig):
    strategies: tuple[str, ...] = ("jit", "shard_map", "pmap", "local_sgd")
    """data-parallel strategies, comma-separated"""
    devices: tuple[int, ...] = (1, 2, 4, 8)
    """device counts, comma-separated"""
    global_batch: int = 512
    """images per step, over all devices"""
    steps: int = 40
    """timed steps per round"""
    warmup: int = 5
    """untimed steps before each round's timed ones"""
    rounds: int = 3
    """alternating rounds (the median is reported)"""


def _time_steps(step, state, batches, warmup: int):
    import jax

    for batch in batches[:warmup]:
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for batch in batches[warmup:]:
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def baseline_runner(devices, tx, cnn):
    """The hand-written reference: what `jaxdist` must not be slower than."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    loss_fn = cnn.loss_fn
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    graphdef, params = nnx.split(cnn.build(seed=0))
    state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P("data"))

    def _step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(_step, donate_argnums=0)

    def run(batches, warmup):
        nonlocal state
        state, seconds = _time_steps(lambda s, b: step(s, jax.device_put(b, batch_sharding)),
                                     state, batches, warmup)
        return seconds

    return run


def toolkit_runner(strategy, devices, tx, cnn):
    from jaxdist import Trainer

    dp = Trainer(cnn.build(seed=0), tx, cnn.loss_fn, strategy=strategy, devices=devices)
    state = dp.init()

    def run(batches, warmup):
        nonlocal state
        state, seconds = _time_steps(dp.step, state, batches, warmup)
        return seconds

    return run


@harness.reports_usage_errors
def main(argv: list[str] | None = None) -> int:
    args = harness.parse(Config, argv, __doc__)
    counts = args.devices
    if not counts or min(counts) < 1:
        return harness.fail(f"--devices takes device counts >= 1, got {counts}")
    configure_cpu_devices(max(counts))

    import numpy as np
    import optax

    from jaxdist import select_devices
    from jaxdist.models import get_model

    all_devices = select_devices(max(counts))
    for n in counts:
        if args.global_batch % n:
            return harness.fail(f"global batch {args.global_batch} does not divide over {n} "
                                f"devices")
    tx = optax.sgd(0.01, momentum=0.9)
    cnn = get_model("cnn").variant()
    rng = np.random.default_rng(0)
    batches = [cnn.random_batch(args.global_batch, rng) for _ in range(args.warmup + args.steps)]
    images = args.global_batch * args.steps
    report = harness.Report(args)
    report.say(f"{all_devices[0].platform}, global batch {args.global_batch}, medians of "
               f"{args.rounds} alternating rounds of {args.steps} steps; ratio = jaxdist / "
               f"hand-written jit loop\n")
    rows = []
    for n in counts:
        devices = all_devices[:n]
        baseline = baseline_runner(devices, tx, cnn)
        for strategy in args.strategies:
            toolkit = toolkit_runner(strategy, devices, tx, cnn)
            harness.progress(f"{strategy} on {n} device(s)")
            ips = harness.alternate(
                {"jaxdist": lambda: images / toolkit(batches, args.warmup),
                 "jit loop": lambda: images / baseline(batches, args.warmup)},
                args.rounds, unit=" img/s")
            a, b = ips["jaxdist"].median, ips["jit loop"].median
            rows.append((strategy, n, f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.3f}"))
    report.table(["strategy", "devices", "img/s", "jit loop img/s", "ratio"], rows)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
