"""The hooks of `fit`: a few named methods instead of closures threaded through the loop.

`fit`'s own services (checkpoint cadence, preemption) are callbacks too, so a user's hook sees
exactly what they see. Every method runs on every process; only the leader should print.
"""

from __future__ import annotations

import signal
from typing import Any

import jax


class Callback:
    """Override what you need; every hook is optional.

    - `on_fit_start(trainer, state, step)`: before the first step (`step`: steps already done,
      > 0 after a resume).
    - `on_step_end(step, state) -> bool`: after step `step` was dispatched; `state` is on the
      devices (reading it waits for the step). True asks `fit` to stop: it saves (with a work dir)
      and returns.
    - `on_metrics(step, metrics)`: step `step`'s metrics as Python floats, read one step late so
      the host never stalls the devices.
    - `on_eval(step, metrics)`: after each evaluation.
    - `on_fit_end(result)`: with the `FitResult`, also when `fit` stopped early.
    """

    def on_fit_start(self, trainer: Any, state: Any, step: int) -> None: ...

    def on_step_end(self, step: int, state: Any) -> bool | None: ...

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, result: Any) -> None: ...


class Preemption(Callback):
    """SIGTERM/SIGINT: finish the current step, then stop (`fit` saves and returns, exit 0).

    With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
    catches SIGTERM on any process, and the processes agree on one step to stop at through
    `reached_preemption(step)` (orbax's `CheckpointManager.reached_preemption` with a work dir),
    so none saves or stops alone.
    """

    def __init__(self, reached_preemption=None):
        self._reached = reached_preemption
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        self._multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, step: int, state: Any) -> bool:
        if not self._multi:
            return self.requested
        if self._reached is not None:
            return bool(self._reached(step)) or self.requested
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        except RuntimeError:  # the preemption service is off
            return self.requested

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
