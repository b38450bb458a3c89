"""The training loop: dispatch steps, read metrics one step late, evaluate at epoch ends.

Reading step N's metrics only after step N+1 has been dispatched keeps the devices busy: the host
never waits for a step to finish before handing over the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Sequence

import jax

from jaxdist.observe.monitor import throughput_key
from jaxdist.parallel.backends import host_metrics
from jaxdist.parallel.trainer import Trainer
from jaxdist.train.callbacks import Callback
from jaxdist.progress import PLAIN_EVERY_SECONDS, Progress


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        state: the final state, in the strategy's layout.
        history: one dict per evaluation: epoch, step, the train loss and the eval metrics.
        first_step_seconds: wall time of the first step (dominated by compilation), from its batch
            in hand to its metrics on the host.
        train_seconds: wall time of all steps after the first, evaluation excluded.
        images_per_second: global examples (images, sequences) per second over
            `train_seconds`.
        stopped: a callback asked to stop before the last step.
    """

    state: Any
    history: list[dict]
    first_step_seconds: float
    train_seconds: float
    images_per_second: float
    stopped: bool = False


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps and nothing to roll back to."""


@dataclasses.dataclass
class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; at `limit`, rolls back or stops.

    Attributes:
        limit: consecutive skipped steps tolerated (0: log them, never act).
        rollback: `first skipped step -> state` restoring the last checkpoint before it, or None
            to stop.
            Training then goes on with the next batch: the window that produced non-finite values
            is skipped, not replayed (replaying it would fail the same way).
    """

    limit: int = 0
    rollback: Callable[[int], Any] | None = None
    log: Callable[[str], None] = print
    consecutive: int = 0
    skipped: int = 0

    def check(self, step: int, metrics: dict[str, float], state: Any) -> Any:
        """Inspects the host metrics of `step`; returns the state to continue with."""
        if not metrics.get("nonfinite", 0.0):
            self.consecutive = 0
            return state
        self.consecutive += 1
        self.skipped += 1
        self.log(f"step {step}: non-finite loss or gradient, update skipped "
                 f"({self.consecutive} in a row)")
        if not self.limit or self.consecutive < self.limit:
            return state
        first_bad, self.consecutive = step - self.consecutive + 1, 0
        if self.rollback is None:
            raise TrainingDiverged(
                f"{self.limit} consecutive non-finite steps up to step {step}; stopping. Lower "
                f"the learning rate, check the data, or train with a work dir to roll back")
        return self.rollback(first_bad)


def epoch_end_steps(num_examples: int, global_batch: int, epochs: float) -> list[int]:
    """The step counts after which epoch 1, 2, ... ends (the last one may be fractional)."""
    total = math.ceil(epochs * num_examples / global_batch)
    ends = [math.ceil(e * num_examples / global_batch) for e in range(1, math.ceil(epochs) + 1)]
    return sorted({min(s, total) for s in ends})


def train_loop(
    dp: Trainer,
    state: Any,
    batches: Iterator[Any],
    *,
    epoch_ends: list[int],
    start_step: int = 0,
    evaluate: Callable[[Any], dict] | None = None,
    progress: bool = True,
    progress_every: float = PLAIN_EVERY_SECONDS,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Callback] = (),
    guard: NonFiniteGuard | None = None,
    monitor: Any = None,
    unit: tuple[str, int] = ("img", 1),
) -> FitResult:
    """Trains until the last of `epoch_ends`, evaluating after each (the inner loop of `fit`).

    Args:
        batches: this process's share of consecutive global batches, from step `start_step` on.
        epoch_ends: the step counts at which an epoch ends (see `epoch_end_steps`).
        evaluate: state -> metrics dict, called at each epoch end; None (interrupted by a
            signal) stops the run there.
        progress: show progress: a bar on a terminal, else a plain line at most every
            `progress_every` seconds (0: every step). Only process 0 prints anything.
        callbacks: `Callback`s; `on_step_end` returning True stops after that step.
        guard: what to do about skipped non-finite steps (default: log them).
        monitor: a `jaxdist.observe.metrics.TrainMonitor`: per-step and per-epoch records,
            goodput, MFU, profiling, hang status (it sees each step's metrics when they are read
            here anyway, one step late; it never blocks on a running step).
        unit: (name, count per example): what throughput counts, e.g. ("tokens", seq_len);
            the progress and epoch lines say `<name>/s`.

    Each epoch line shows the train loss, every metric `evaluate` returned (whatever its
    prefix) and the throughput.
    """
    leader = jax.process_index() == 0
    show = progress and leader
    guard = guard or NonFiniteGuard(log=log if leader else lambda _: None)
    history: list[dict] = []
    first_step_seconds = 0.0
    train_seconds = 0.0
    trained_images = 0
    step = start_step
    pending = None  # metrics of the last dispatched step, read after the next is dispatched
    last_loss = float("nan")
    stopped = False
    monitor = monitor if monitor is not None else _NoMonitor()
    measure = monitor.measure
    unit_name, per_example = unit
    for epoch, end in enumerate(epoch_ends, start=1):
        if end <= step or stopped:
            continue
        bar = Progress(f"epoch {epoch}/{len(epoch_ends)}", total=epoch_ends[-1], done=step,
                       enabled=show, every=progress_every)
        epoch_start = time.perf_counter()
        epoch_images = 0
        while step < end:
            monitor.phase("data")
            with measure("data"):
                batch = next(batches)
            monitor.start_step(step, start_step)
            with measure("compile" if step == start_step else "step"):
                t0 = time.perf_counter()  # the first step excludes starting the input pipeline
                batch = dp.shard_batch(batch)
                state, metrics = dp.step(state, batch)
                images = dp.global_batch_size(batch)
                if step == start_step:
                    jax.block_until_ready(metrics)
                    first_step_seconds = time.perf_counter() - t0
                    # before the epoch clock starts: on CPU it may compile for FLOPs (oneDNN)
                    monitor.first_step(step + 1, first_step_seconds, dp, state, batch)
                    epoch_start = time.perf_counter()
                else:
                    epoch_images += images
                monitor.dispatched(step, metrics)
                if pending is not None:
                    last_loss, state = _read(pending, step, state, guard, monitor, callbacks)
                pending = (metrics, images)
                step += 1
                elapsed = time.perf_counter() - epoch_start
                loss = f"{last_loss:.4f}" if step > start_step + 1 else "-"
                speed = f"{epoch_images * per_example / elapsed:,.0f}" if epoch_images else "-"
                bar.update(1, f"loss {loss} | {speed} {unit_name}/s")
                if any([bool(cb.on_step_end(step, state)) for cb in callbacks]):
                    stopped = True  # every callback saw the step (a list, not a short circuit)
                    break
        with measure("step"):
            jax.block_until_ready(state)
        epoch_seconds = time.perf_counter() - epoch_start
        bar.close()
        train_seconds += epoch_seconds
        trained_images += epoch_images
        if pending is not None:
            with measure("step"):
                last_loss, state = _read(pending, step, state, guard, monitor, callbacks)
            pending = None
        record = {"epoch": epoch, "step": step, "train_loss": last_loss,
                  "epoch_seconds": epoch_seconds,
                  "images_per_second": epoch_images / epoch_seconds if epoch_seconds else 0.0}
        record[throughput_key(unit_name)] = record["images_per_second"] * per_example
        eval_keys: tuple[str, ...] = ()
        if evaluate is not None and not stopped:
            monitor.phase("eval")
            with measure("eval"):
                metrics = evaluate(state)
            if metrics is None:  # interrupted by a signal: stop with the state as it is
                stopped = True
            else:
                record.update(metrics)
                eval_keys = tuple(metrics)
                for cb in callbacks:
                    cb.on_eval(step, metrics)
        history.append(record)
        monitor.epoch_end(record, eval_keys)
        if leader:
            log(_format_record(record, eval_keys, unit_name))
    return FitResult(
        state=state,
        history=history,
        first_step_seconds=first_step_seconds,
        train_seconds=train_seconds,
        images_per_second=trained_images / train_seconds if train_seconds else 0.0,
        stopped=stopped,
    )


def _read(pending: tuple[dict, int], step: int, state: Any, guard: NonFiniteGuard,
          monitor: Any, callbacks: Sequence[Callback] = ()) -> tuple[float, Any]:
    """The loss of `step` (read from the device now) and the state to go on with."""
    metrics, images = pending
    values = host_metrics(metrics)
    monitor.step_done(step, values, images)
    for cb in callbacks:
        cb.on_metrics(step, values)
    return values["loss"], guard.check(step, values, state)


class _NoMonitor:
    """What `fit` calls on a `TrainMonitor`, doing nothing (no logdir, no watchdog)."""

    def measure(self, category: str):
        return contextlib.nullcontext()

    def phase(self, phase: str, step: int | None = None) -> None: ...

    def start_step(self, index: int, start_step: int) -> None: ...

    def first_step(self, step, seconds, trainer, state, batch) -> None: ...

    def dispatched(self, index: int, metrics: Any) -> None: ...

    def step_done(self, step: int, values: dict, images: int) -> None: ...

    def epoch_end(self, record: dict, eval_keys: Sequence[str] = ()) -> None: ...


def _format_record(r: dict, eval_keys: Sequence[str] = (), unit: str = "img") -> str:
    """The epoch line: train loss, the evaluation's metrics (`eval_keys` of `r`), throughput."""
    parts = [f"epoch {r['epoch']}", f"step {r['step']}", f"train loss {r['train_loss']:.4f}"]
    for key in eval_keys:
        value = r[key]
        shown = f"{100 * value:.2f}%" if "accuracy" in key else f"{value:.4f}"
        parts.append(f"{key.replace('_', ' ')} {shown}")
    parts.append(f"{r[throughput_key(unit)]:,.0f} {unit}/s")
    return " | ".join(parts)
