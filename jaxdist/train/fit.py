"""`fit(trainer, data, ...)`: the training loop with its services, for any model and any data.

    run = jaxdist.fit(trainer, train_data, epochs=8, eval_data=test_data,
                      checkpoint=CheckpointConfig(workdir="runs/a"))

`fit` only composes: the steps come from `training_steps`, and every service is a `Callback`
built from its own config — `Evaluation` (`EvalConfig`), `Checkpointing` (`CheckpointConfig`:
resume, cadence, keep-best, the rollback target), `NonFiniteGuard` (`GuardConfig`),
`TrainMonitor` and `ProgressReport` (`ObserveConfig`: metrics, TensorBoard, goodput, MFU,
profiles, the hang watchdog) and `Preemption` (SIGTERM/SIGINT: all processes stop at one step,
with a checkpoint). With a work dir, `fit` holds it for this job alone (`jaxdist.io.workdir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import numpy as np

from jaxdist.core.callback import Callback, throughput_key
from jaxdist.io.workdir import hold
from jaxdist.observe.monitor import ObserveConfig, TrainMonitor
from jaxdist.train.checkpointing import CheckpointConfig, Checkpointing
from jaxdist.train.evaluation import EvalConfig, Evaluation
from jaxdist.train.guard import GuardConfig, NonFiniteGuard, RollBack, TrainingDiverged
from jaxdist.train.loop import STOP, Schedule, training_steps, unmeasured
from jaxdist.train.preemption import Preemption
from jaxdist.train.reporting import ProgressReport


class Data(Protocol):
    """What `fit` reads: a `jaxdist.data.Dataset` or anything with these."""

    global_batch: int

    def __len__(self) -> int: ...

    @property
    def meta(self) -> dict: ...

    def batches(self, start_step: int = 0) -> Iterator[Any]: ...


class EvalData(Protocol):
    def eval_batches(self, global_batch: int | None = None, *, limit: int | None = None
                     ) -> Iterator[tuple[Any, np.ndarray]]: ...


@dataclasses.dataclass
class Run:
    """What `fit` returns.

    Attributes:
        state: the final state, in the strategy's layout.
        history: one record per epoch end (evaluation point): epoch, step, the train loss,
            epoch_seconds, images_per_second (examples), `<unit>_per_second` and the eval
            metrics.
        first_step_seconds: wall time of the first step (dominated by compilation), from its batch
            in hand to its metrics on the host.
        train_seconds: wall time of all steps after the first, evaluation excluded.
        images_per_second: global examples (images, sequences) per second over `train_seconds`.
        stopped: a signal or a callback stopped it before the last step, at `stopped_at`.
        last_step: the step it ended at (the key of its last checkpoint).
        goodput: seconds per category (from the monitor; None without one).
    """

    state: Any
    history: list[dict] = dataclasses.field(default_factory=list)
    first_step_seconds: float = 0.0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped: bool = False
    start_step: int = 0
    stopped_at: int | None = None
    total_steps: int = 0
    last_step: int = 0
    goodput: dict | None = None
    wall_seconds: float = 0.0


def fit(
    trainer: Any,
    data: Data,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    eval_data: EvalData | None = None,
    eval: EvalConfig = EvalConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    observe: ObserveConfig = ObserveConfig(),
    guard: GuardConfig = GuardConfig(),
    callbacks: Sequence[Callback] = (),
    meta: dict | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    """Trains `trainer` on `data` for `epochs` (or `steps`; both: the fewer), with the services.

    Args:
        eval_data: evaluated with the trainer's `eval_fn` at every epoch end (or every
            `eval.every` steps, and at the end). `eval_fn` returns sums over the batch's examples,
            padding masked out (the batch comes with its mask last); with a "count" sum, the
            others are reported as means, named `<eval.prefix>_<name>`.
        checkpoint: with a `workdir`, checkpoints go to `<workdir>/checkpoints` and logs to
            `<workdir>/logs`; a rerun resumes. One job at a time: another job's fit on it raises
            `UsageError` naming the holder. The data's `meta` is saved with each checkpoint,
            and a resume with other values is refused.
        observe: progress, the log dir, the profiler, MFU's peak, the hang watchdog.
        guard: the non-finite limit (a rollback to the last checkpoint before the window, or
            `TrainingDiverged` without one).
        callbacks: user hooks (see `Callback`), called after the services.
        meta: more fields for the run's metadata record (model, ...).
    """
    start = time.perf_counter()
    for config in (eval, checkpoint, observe, guard):
        config.validate()
    schedule = Schedule.of(data, epochs=epochs, steps=steps, eval_every=eval.every or None)
    leader = jax.process_index() == 0
    say = log if leader else (lambda _: None)
    workdir = checkpoint.workdir
    logdir = observe.logdir_for(workdir)
    unit = (getattr(data, "unit", "img"), getattr(data, "units_per_example", 1))
    with contextlib.ExitStack() as stack:
        if workdir is not None:  # a second job on this work dir ends here, before any write
            stack.enter_context(hold(workdir))
        monitor = None
        if observe.wanted(logdir):
            run_meta = {"devices": len(trainer.devices), "platform": trainer.devices[0].platform,
                        "strategy": trainer.strategy, "global_batch": data.global_batch,
                        "steps": schedule.total, "eval_prefix": eval.prefix, **(meta or {})}
            monitor = stack.enter_context(TrainMonitor(
                observe, logdir=logdir, start=start, meta=run_meta if logdir else None,
                unit=unit, examples_per_step=data.global_batch))
        measure = monitor.measure if monitor is not None else unmeasured
        # from here on SIGTERM/SIGINT stop the run with a checkpoint: during set-up and restore,
        # the first compile, evaluation and saves in flight, not only between steps
        preemption = stack.enter_context(Preemption())
        state, start_step, checkpointing = trainer.init(), 0, None
        if workdir is not None:
            checkpointing = stack.enter_context(Checkpointing(
                checkpoint, trainer, data_meta=dict(data.meta), epoch_ends=schedule.epoch_ends,
                log=say, measure=measure))
            state, start_step = checkpointing.restore(state)
            preemption.reached = checkpointing.reached_preemption  # processes agree via orbax
        services: list[Callback] = [
            Evaluation(eval, eval_data, trainer, preemption=preemption, measure=measure)
        ] if eval_data is not None else []
        services += [s for s in (checkpointing, monitor) if s is not None]
        services += [ProgressReport(observe, total_steps=schedule.total,
                                    examples_per_step=data.global_batch, unit=unit, log=say),
                     preemption, *callbacks, NonFiniteGuard(guard, log=say)]
        run = _train(trainer, data, state, start_step, schedule, services, unit, measure,
                     rollback=checkpointing.state_before if checkpointing else _diverged)
    run.wall_seconds = time.perf_counter() - start
    return run


def _diverged(rollback: RollBack):
    raise TrainingDiverged(f"{rollback}; stopping. Lower the learning rate, check the data, or "
                           f"train with a work dir to roll back")


def _train(trainer, data, state, start_step: int, schedule: Schedule, hooks: list[Callback],
           unit: tuple[str, int], measure, rollback) -> Run:
    """Drives `training_steps` epoch by epoch, calling every hook; returns the `Run`."""
    for cb in hooks:
        cb.on_fit_start(trainer, state, start_step)
    run = Run(state, start_step=start_step, total_steps=schedule.total, last_step=start_step)
    batches = data.batches(start_step)
    epochs, loss, trained = len(schedule.epoch_ends), math.nan, 0
    for epoch, end in enumerate(schedule.epoch_ends, start=1):
        if end <= run.last_step or run.stopped:
            continue
        for cb in hooks:
            cb.on_epoch_start(epoch, epochs, run.last_step)
        clock, examples, reply = time.perf_counter(), 0, None
        steps = training_steps(trainer, state, batches, start=run.last_step, stop=end,
                               measure=measure)
        while True:
            try:
                info = steps.send(reply)
            except StopIteration:
                break
            state, reply = info.state, None
            if info.first_step_seconds is not None:
                run.first_step_seconds = info.first_step_seconds
                for cb in hooks:  # before the epoch clock starts: it may compile for FLOPs
                    cb.on_first_step(info.step, info.first_step_seconds, state, info.batch)
                clock = time.perf_counter()
            elif info.step > run.last_step:
                examples += data.global_batch
            if info.metrics is not None:
                loss = info.metrics[1]["loss"]
                try:
                    for cb in hooks:
                        cb.on_metrics(*info.metrics)
                except RollBack as e:
                    state = reply = rollback(e)
            if info.step == run.last_step:  # the last step's metrics, read after it
                continue
            run.last_step = info.step
            if any([bool(cb.on_step_end(info.step, state)) for cb in hooks]):
                run.stopped, reply = True, STOP  # every hook saw the step: a list, no short cut
        seconds = time.perf_counter() - clock
        run.train_seconds, trained = run.train_seconds + seconds, trained + examples
        record = {"epoch": epoch, "step": run.last_step, "train_loss": loss,
                  "epoch_seconds": seconds,
                  "images_per_second": examples / seconds if seconds else 0.0}
        _end_epoch(run, record, state, hooks, unit)
    if not run.history and not run.stopped:  # resumed at the end: still report where it ended
        _end_epoch(run, {"epoch": epochs, "step": run.last_step, "train_loss": math.nan,
                         "epoch_seconds": 0.0, "images_per_second": 0.0}, state, hooks, unit)
    run.state = state
    run.images_per_second = trained / run.train_seconds if run.train_seconds else 0.0
    run.stopped_at = run.last_step if run.stopped else None
    for cb in hooks:
        cb.on_fit_end(run)
    return run


def _end_epoch(run: Run, record: dict, state: Any, hooks: list[Callback],
               unit: tuple[str, int]) -> None:
    record[throughput_key(unit[0])] = record["images_per_second"] * unit[1]
    if run.stopped:
        record["stopped"] = True
    if any([bool(cb.on_epoch_end(record, state)) for cb in hooks]):
        run.stopped = True
    evaluated = {k: record[k] for k in record.get("eval_keys", ())}
    if evaluated:
        for cb in hooks:
            cb.on_eval(record["step"], evaluated)
    run.history.append({k: v for k, v in record.items() if k not in ("eval_keys", "stopped")})
