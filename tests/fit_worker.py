"""Trains the tests' task through `jaxdist.fit`, then process 0 saves the final state.

    python tests/fit_worker.py OUT.npz STRATEGY STEPS [WORKDIR]

Run alone or under `python -m jaxdist.launch`; with WORKDIR it checkpoints every 10 steps and
resumes when run again. Prints a progress line per step (a test's events).
"""

import sys

from jaxdist.cluster import configure_cpu_devices, initialize

configure_cpu_devices()
initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdist  # noqa: E402
from task import MLP, arrays, eval_fn, leaves, loss_fn  # noqa: E402


def main(out: str, strategy: str, steps: int, workdir: str | None = None) -> None:
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0, dropout=1)), optax.adam(3e-3), loss_fn,
                              strategy=strategy, eval_fn=eval_fn)
    x, y = arrays()
    run = jaxdist.fit(trainer, jaxdist.data.from_arrays((x, y), global_batch=64, seed=0),
                      steps=steps, eval_data=jaxdist.data.from_arrays(arrays(256, 1),
                                                                      global_batch=64),
                      workdir=workdir, checkpoint_every=10, progress_every=0)
    state = leaves(trainer.canonical(run.state))
    if jax.process_index() == 0:
        if run.stopped:
            print(f"stopped at step {run.stopped_at}", flush=True)
        else:
            np.savez(out, *state)
            print(f"done: {run.history[-1]['test_accuracy']:.4f} on {jax.device_count()} devices "
                  f"of {jax.process_count()} process(es)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
