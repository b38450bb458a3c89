"""`Preemption`: SIGTERM/SIGINT end a run with a checkpoint, all processes at one step."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax

from jaxdist.core.callback import Callback


class Preemption(Callback):
    """SIGTERM/SIGINT: finish the current step, then stop (`fit` saves and returns, exit 0).

    Active for the whole of `fit`: a signal during set-up or restore, the first compile, or a
    save in flight stops the run after the next step; one during evaluation stops it between
    evaluation batches (one process; with several, after the evaluation, since all must run the
    same collectives).

    With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
    catches SIGTERM on any process, and the processes agree on one step to stop at through
    `reached(step)` (orbax's `CheckpointManager.reached_preemption` with a work dir), so none
    saves or stops alone. SIGINT (Ctrl-C) to any process is turned into a SIGTERM to itself and
    takes the same path; only with the preemption service off does it stop that process alone.
    """

    class Interrupted(Exception):
        """Raised out of `interruptible` iteration when a signal arrived."""

    def __init__(self, reached=None):
        self.reached = reached
        self.requested = False
        self._previous: dict = {}
        self._multi = False

    def __enter__(self) -> "Preemption":
        self._multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        return self

    def _handle(self, signum, frame) -> None:
        if self._multi and _preemption_service_on():
            os.kill(os.getpid(), signal.SIGTERM)  # to the service's handler: all stop together
            return
        self.requested = True

    def interruptible(self, items):
        """`items`, ending with `Interrupted` at a signal (one process only: see the class)."""
        for item in items:
            if self.requested and not self._multi:
                raise Preemption.Interrupted()
            yield item

    def on_step_end(self, step: int, state: Any) -> bool:
        if not self._multi:
            return self.requested
        if self.reached is not None:
            return bool(self.reached(step)) or self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        except RuntimeError:  # the preemption service is off
            return self.requested

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _preemption_service_on() -> bool:
    """Whether JAX's preemption service runs in this process (it catches SIGTERM)."""
    try:
        from jax._src import distributed  # private: the service has no public handle

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):  # pragma: no cover - layout changed
        return False
