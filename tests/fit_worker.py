"""Trains the tests' task through `jaxdist.fit`, then process 0 saves the final state.

    python tests/fit_worker.py OUT.npz STRATEGY STEPS [WORKDIR]

Run alone or under `python -m jaxdist.launch`; with WORKDIR it checkpoints every 10 steps and
resumes when run again. Prints a progress line per step (a test's events). With
FIT_SIGTERM_AT=compile|eval|save it sends itself SIGTERM at that event: while the first step is
traced, after the first evaluation batch, or at step 10 just before that step's save is issued
(which is then in flight when the next step stops the run). FIT_HANG_TIMEOUT sets fit's
hang_timeout (default 300 s). FIT_CRASH_AT=N makes process 1 raise a plain RuntimeError at step N
of the job's first start under the launcher (JAXDIST_RESTART=0): a crash a restart cures.
"""

import os
import signal
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


SIGTERM_AT = os.environ.get("FIT_SIGTERM_AT", "")
CRASH_AT = int(os.environ.get("FIT_CRASH_AT", "0"))


def sigterm_self() -> None:
    print(f"sending SIGTERM to myself ({SIGTERM_AT})", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def traced_loss(model, batch):
    if SIGTERM_AT == "compile":
        sigterm_self()  # Python here runs while the step is traced for its first compile
    return loss_fn(model, batch)


class EvalData:
    """The evaluation set, signalling after its first batch with FIT_SIGTERM_AT=eval."""

    def __init__(self, data):
        self.data = data

    def eval_batches(self, *args, **kwargs):
        for k, batch in enumerate(self.data.eval_batches(*args, **kwargs)):
            if k == 1 and SIGTERM_AT == "eval":
                sigterm_self()
            yield batch


class SignalBeforeSave(jaxdist.Callback):
    def on_step_end(self, step, state):
        if step == 10 and SIGTERM_AT == "save":
            sigterm_self()
        if (step == CRASH_AT and jax.process_index() == 1
                and os.environ.get("JAXDIST_RESTART") == "0"):
            raise RuntimeError("a transient crash (e.g. an I/O error) after joining")


def main(out: str, strategy: str, steps: int, workdir: str | None = None) -> None:
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0, dropout=1)), optax.adam(3e-3), traced_loss,
                              strategy=strategy, eval_fn=eval_fn)
    x, y = arrays()
    run = jaxdist.fit(trainer, jaxdist.data.from_arrays((x, y), global_batch=64, seed=0),
                      steps=steps, eval_data=EvalData(jaxdist.data.from_arrays(arrays(256, 1),
                                                                               global_batch=64)),
                      checkpoint=jaxdist.CheckpointConfig(workdir=workdir, every=10),
                      observe=jaxdist.ObserveConfig(
                          progress_every=0,
                          hang_timeout=float(os.environ.get("FIT_HANG_TIMEOUT", "300"))),
                      callbacks=[SignalBeforeSave()])
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
