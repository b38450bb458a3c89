"""Images/s of each data-parallel backend on 1, 2, 4, 8 devices, against a hand-written jit loop.

    python -m experiments.bench_dp                      # global batch 512, all backends
    python -m experiments.bench_dp --devices 8 --strategies jit --steps 100

Both sides train the MNIST CNN with the same optax optimizer on the same host batches (random
uint8 images, so the input pipeline is not measured) and pay the same host->device transfer per
step. The baseline is the minimal loop a JAX user would write: replicated state, batch sharded
over a 1-D mesh, `jax.jit(step, donate_argnums=0)`. Rounds alternate toolkit and baseline and the
medians are reported; ratio = toolkit / baseline (the toolkit's overhead is 1 - ratio).
"""

from __future__ import annotations

import statistics
import sys
import time

from jaxdist.cluster import configure_cpu_devices
from jaxdist.config import ArgumentParser


def _batches(global_batch: int, count: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (global_batch, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, global_batch).astype(np.int32)) for _ in range(count)]


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


def baseline_runner(devices, tx, loss_fn):
    """The hand-written reference: what `jaxdist` must not be slower than."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdist.models import MnistCNN

    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    graphdef, params = nnx.split(MnistCNN(rngs=nnx.Rngs(0)))
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


def toolkit_runner(strategy, devices, tx, loss_fn):
    from flax import nnx

    from jaxdist import DataParallel
    from jaxdist.models import MnistCNN

    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), tx, loss_fn, strategy=strategy, devices=devices)
    state = dp.init()

    def run(batches, warmup):
        nonlocal state
        state, seconds = _time_steps(dp.step, state, batches, warmup)
        return seconds

    return run


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.bench_dp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="jit,shard_map,pmap,local_sgd")
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--global_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median taken)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    configure_cpu_devices(max(counts))

    import jax
    import optax

    from experiments.mnist import loss_fn
    from jaxdist import select_devices
    from jaxdist.errors import UsageError

    try:
        all_devices = select_devices(max(counts))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in counts:
        if args.global_batch % n:
            print(f"error: global batch {args.global_batch} does not divide over {n} devices",
                  file=sys.stderr)
            return 2
    tx = optax.sgd(0.01, momentum=0.9)
    batches = _batches(args.global_batch, args.warmup + args.steps)
    images = args.global_batch * args.steps
    from jaxdist.observe.machine import describe_machine

    print(f"# {describe_machine()}")
    print(f"jax {jax.__version__}, {all_devices[0].platform}, global batch {args.global_batch}, "
          f"{args.steps} steps x {args.rounds} rounds", flush=True)
    header = f"{'strategy':<10} {'devices':>7} {'img/s':>9} {'jit loop img/s':>15} {'ratio':>6}"
    print(header)
    for n in counts:
        devices = all_devices[:n]
        baseline = baseline_runner(devices, tx, loss_fn)
        for strategy in args.strategies.split(","):
            toolkit = toolkit_runner(strategy, devices, tx, loss_fn)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(images / toolkit(batches, args.warmup))
                theirs.append(images / baseline(batches, args.warmup))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{strategy:<10} {n:>7} {a:>9,.0f} {b:>15,.0f} {a / b:>6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
