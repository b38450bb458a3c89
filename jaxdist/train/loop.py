"""The training loop as one generator: dispatch steps, read metrics one step late.

Reading step N's metrics only after step N+1 has been dispatched keeps the devices busy: the host
never waits for a step to finish before handing over the next one. Everything else a run does
(evaluate, save, report, watch) is a `Callback` that `fit` calls around these steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Generator, Iterator

import jax

from jaxdist.errors import UsageError
from jaxdist.parallel.backends import host_metrics


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run trains, in steps: the one place epochs become steps.

    Attributes:
        epoch_ends: the step counts after which epoch 1, 2, ... ends (evaluation points: with
            `eval_every`, every that many steps instead); the last one is the run's length.
    """

    epoch_ends: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.epoch_ends[-1]

    @classmethod
    def of(cls, data: Any, *, epochs: float | None = None, steps: int | None = None,
           eval_every: int | None = None) -> "Schedule":
        """`epochs` over `data` (`len(data)` examples, `data.global_batch` per step), or `steps`
        (both: the fewer); `eval_every` steps, the evaluation points replace the epoch ends."""
        if epochs is None and steps is None:
            raise UsageError("fit needs epochs= or steps=")
        if epochs is not None and not epochs > 0:
            raise UsageError(f"epochs must be positive, got {epochs}")
        if steps is not None and steps < 1:
            raise UsageError(f"steps must be at least 1, got {steps}")
        if eval_every is not None and eval_every < 1:
            raise UsageError(f"eval_every must be at least 1, got {eval_every}")
        examples, batch = len(data), data.global_batch
        if epochs is None:
            epochs = steps * batch / examples
        total = math.ceil(epochs * examples / batch)
        ends = {min(math.ceil(e * examples / batch), total)
                for e in range(1, math.ceil(epochs) + 1)}
        if steps is not None:
            ends = {min(e, steps) for e in ends}
        if eval_every is not None:
            last = max(ends)
            ends = set(range(eval_every, last, eval_every)) | {last}
        return cls(tuple(sorted(ends)))


@dataclasses.dataclass
class StepInfo:
    """What `training_steps` yields after each step is dispatched.

    Attributes:
        step: steps done (the state's step, a checkpoint's key).
        state: the state after it, on the devices (reading it waits for the step).
        metrics: (n, host metrics of step n) for the step before, read now (one step late);
            after the last step, its own; None for the run's first step.
        first_step_seconds: for the run's first step, its wall time (mostly compilation) from
            batch in hand to metrics on the host; None after.
        batch: the sharded batch, given with the first step only (to look up its FLOPs).
    """

    step: int
    state: Any
    metrics: tuple[int, dict[str, float]] | None
    first_step_seconds: float | None = None
    batch: Any = None


STOP = object()
"""Sent into `training_steps` to end it early (it still reads the last step's metrics)."""


def unmeasured(category: str):
    return contextlib.nullcontext()


def training_steps(trainer: Any, state: Any, batches: Iterator[Any], *, start: int, stop: int,
                   measure: Callable[[str], Any] = unmeasured
                   ) -> Generator[StepInfo, Any, Any]:
    """Runs steps `start + 1 .. stop` of `trainer` on `batches` (this process's share of the
    global batches from step `start` on), yielding a `StepInfo` after each; returns the state.

    `send(state)` replaces the state the next step starts from (a rollback); `send(STOP)` ends
    the steps there. After the last step it waits for the devices and yields once more with that
    step's metrics. `measure(category)`
    (data, compile, step) is a context manager timing each part for goodput.
    """
    pending = None  # (step, device metrics) dispatched but not yet read
    for done in range(start, stop):
        with measure("data"):
            batch = next(batches)
        first = done == start
        with measure("compile" if first else "step"):
            t0 = time.perf_counter()  # the first step excludes starting the input pipeline
            batch = trainer.shard_batch(batch)
            state, metrics = trainer.step(state, batch)
            seconds = None
            if first:
                jax.block_until_ready(metrics)
                seconds = time.perf_counter() - t0
            read = (pending[0], host_metrics(pending[1])) if pending is not None else None
        pending = (done + 1, metrics)
        replaced = yield StepInfo(done + 1, state, read, seconds, batch if first else None)
        if replaced is STOP:
            break
        if replaced is not None:
            state = replaced
    if pending is not None:
        with measure("step"):
            jax.block_until_ready(state)
            read = (pending[0], host_metrics(pending[1]))
        replaced = yield StepInfo(pending[0], state, read)
        if replaced is not None:
            state = replaced
    return state
