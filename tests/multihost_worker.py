"""A worker for the multi-host tests: K data-parallel steps on MNIST, then process 0 saves params.

    python tests/multihost_worker.py OUT.npz STRATEGY STEPS

Run alone (one process, all its devices) or under `python -m jaxdist.launch`; the global batches
are the same either way, so the saved parameters must be too.
"""

import sys

from jaxdist.cluster import configure_cpu_devices, initialize

configure_cpu_devices()
initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdist.models.classification import mnist_loss as loss_fn  # noqa: E402
from jaxdist import Trainer  # noqa: E402
from jaxdist.data import load_split  # noqa: E402
from jaxdist.data.pipeline import train_batches  # noqa: E402
from jaxdist.models import MnistCNN  # noqa: E402
from jaxdist.parallel.backends import to_host  # noqa: E402


def main(out: str, strategy: str, steps: int) -> None:
    split = load_split("mnist", "train", progress=False)
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.05, momentum=0.9), loss_fn,
                 strategy=strategy)
    batches = train_batches(split, 64, seed=0, process_index=jax.process_index(),
                            process_count=jax.process_count())
    state = dp.init()
    for _ in range(steps):
        state, _ = dp.step(state, next(batches))
    params = [to_host(x) for x in jax.tree.leaves(dp.canonical(state).params)]
    if jax.process_index() == 0:
        np.savez(out, *params)
    print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
