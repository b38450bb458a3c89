"""`fit(trainer, data, ...)`: the training loop with its services, for any model and any data.

    result = jaxdist.fit(trainer, train_data, epochs=8, eval_data=test_data, workdir="runs/a")

With a work dir, `fit` holds it for this job alone (a second job on it is refused;
`jaxdist.io.workdir`), saves asynchronous orbax checkpoints every `checkpoint_every` steps and at
every evaluation (keeping the newest `keep`, and `keep_best` by `best_metric`), resumes from the
newest one every process can read when run again (bitwise: global batch k depends only on
(seed, k), the state holds the RNG streams, and under local SGD each replica's own state is
kept), refuses a checkpoint whose data settings differ, saves and returns
on SIGTERM/SIGINT (all processes at one step), rolls back after `nonfinite_limit` non-finite steps
in a row, and writes metrics, TensorBoard events, goodput, MFU, profiles and hang-watchdog status
to `<workdir>/logs`. Every hook a user needs is a `Callback`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import jax
import numpy as np

from jaxdist.errors import UsageError
from jaxdist.io.workdir import hold
from jaxdist.progress import PLAIN_EVERY_SECONDS
from jaxdist.train.callbacks import Callback, Preemption
from jaxdist.train.loop import (
    FitResult,
    NonFiniteGuard,
    TrainingDiverged,
    epoch_end_steps,
    train_loop,
)


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
class Run(FitResult):
    """`FitResult` plus where the run started and stopped, and its goodput."""

    start_step: int = 0
    stopped_at: int | None = None
    total_steps: int = 0
    goodput: dict | None = None
    wall_seconds: float = 0.0


def fit(
    trainer: Any,
    data: Data,
    *,
    epochs: float | None = None,
    steps: int | None = None,
    eval_data: EvalData | None = None,
    eval_every: int | None = None,
    eval_batch: int | None = None,
    eval_examples: int | None = None,
    eval_prefix: str = "test",
    workdir: str | Path | None = None,
    checkpoint_every: int = 500,
    keep: int = 3,
    keep_best: int = 0,
    best_metric: str | None = None,
    best_mode: str = "max",
    restore_step: int | None = None,
    data_meta: dict | None = None,
    nonfinite_limit: int = 20,
    progress: bool = True,
    progress_every: float = PLAIN_EVERY_SECONDS,
    logdir: str | Path | None = None,
    profile_steps: tuple[int, int] | None = None,
    hang_timeout: float = 300.0,
    hang_action: str = "exit",
    peak_tflops: float = 0.0,
    run_meta: dict | None = None,
    callbacks: Sequence[Callback] = (),
    log=print,
) -> Run:
    """Trains `trainer` on `data` for `epochs` (or `steps`; both: the fewer), with the services.

    Args:
        eval_data: evaluated with the trainer's `eval_fn` at every epoch end (or every
            `eval_every` steps, and at the end). `eval_fn` returns sums over the batch's examples,
            padding masked out (the batch comes with its mask last); with a "count" sum, the
            others are reported as means, named `<eval_prefix>_<name>`.
        workdir: checkpoints go to `<workdir>/checkpoints` and logs to `<workdir>/logs`; a
            rerun resumes (at `restore_step`, default the newest step all processes can read).
            One job at a time: another job's fit on it raises `UsageError` naming the holder.
        data_meta: more settings that define the data (augmentation, ...); a resume with other
            values is refused, like one with another global batch or seed.
        logdir: metrics.jsonl, TensorBoard events, status files, profiles (default
            `<workdir>/logs`, or none without a work dir).
        hang_timeout: seconds without progress (3x before the first step completed) before the
            watchdog acts (0: off).
        hang_action: "exit": every live process writes its stacks and the verdict (which
            process is behind, in which phase) to `<logdir>/status` and exits with
            `jaxdist.errors.EXIT_HANG`, for the launcher or scheduler to restart the job;
            "report": only print the verdict.
        callbacks: user hooks (see `Callback`).

    Returns:
        a `Run`: the final state, per-evaluation history, timings, and `stopped_at` when a
        signal or a callback stopped it early.
    """
    start = time.perf_counter()
    leader = jax.process_index() == 0
    say = log if leader else (lambda _: None)
    epoch_ends = _epoch_ends(data, epochs, steps, eval_every)
    total_steps = epoch_ends[-1]
    if logdir is None and workdir is not None:
        logdir = Path(workdir) / "logs"
    # a second job on this work dir ends here, before it writes anything
    with hold(workdir) if workdir is not None else contextlib.nullcontext():
        monitor = _monitor(logdir, start, profile_steps, hang_timeout, hang_action, peak_tflops,
                           trainer, data, total_steps,
                           {"eval_prefix": eval_prefix, **(run_meta or {})})
        measure = monitor.measure if monitor is not None else (
            lambda _: contextlib.nullcontext())
        meta_now = {**dict(data.meta), **dict(data_meta or {})}
        # from here on SIGTERM/SIGINT stop the run with a checkpoint: during set-up and restore,
        # the first compile, evaluation and saves in flight, not only between steps
        preemption = Preemption()
        with preemption:
            return _fit(trainer, data, preemption=preemption, epoch_ends=epoch_ends,
                        total_steps=total_steps, monitor=monitor, measure=measure,
                        meta_now=meta_now, say=say, log=log, start=start, eval_data=eval_data,
                        eval_batch=eval_batch, eval_examples=eval_examples,
                        eval_prefix=eval_prefix, workdir=workdir,
                        checkpoint_every=checkpoint_every, keep=keep, keep_best=keep_best,
                        best_metric=best_metric, best_mode=best_mode, restore_step=restore_step,
                        nonfinite_limit=nonfinite_limit, progress=progress,
                        progress_every=progress_every, callbacks=callbacks)


def _fit(trainer, data, *, preemption, epoch_ends, total_steps, monitor, measure, meta_now, say,
         log, start, eval_data, eval_batch, eval_examples, eval_prefix, workdir,
         checkpoint_every, keep, keep_best, best_metric, best_mode, restore_step,
         nonfinite_limit, progress, progress_every, callbacks) -> "Run":
    state, start_step, checkpointer = trainer.init(), 0, None
    if workdir is not None:
        from jaxdist.io import Checkpointer

        checkpointer = Checkpointer(Path(workdir) / "checkpoints", every=checkpoint_every,
                                    keep=keep, keep_best=keep_best, best_metric=best_metric,
                                    best_mode=best_mode)
        restored = _resume(checkpointer, restore_step, trainer, state)
        start_step = restored.step
        if restored.step:
            _check_same_data(restored.meta, meta_now, start_step)
            state = _placed(trainer, restored)
            say(f"resuming at step {start_step} from {checkpointer.directory}")
    position = start_step  # global batches consumed: the key of the next checkpoint

    def save(step, state, metrics=None):
        if monitor is not None:
            monitor.phase("checkpoint")
        with measure("checkpoint"):
            checkpointer.save(step, trainer.canonical(state), replicas=trainer.replicas(state),
                              meta={**meta_now, "data_position": step}, metrics=metrics)

    def evaluate(state):
        """The metrics, or None when a signal interrupted it (one process: between batches)."""
        batches = _with_masks(eval_data.eval_batches(eval_batch, limit=eval_examples))
        try:
            sums = trainer.evaluate(state, preemption.interruptible(batches))
        except Preemption.Interrupted:
            return None
        metrics = _means(sums, eval_prefix)
        if checkpointer is not None:  # evaluation points are always saved, with their metrics
            save(position, state, metrics)
        return metrics

    def rollback(first_bad_step):
        if checkpointer is not None:
            checkpointer.wait()
            fresh = trainer.init()
            restored = checkpointer.resume(trainer.canonical(fresh),
                                           replicas_like=trainer.replicas(fresh),
                                           below=first_bad_step)
            if restored.step:
                say(f"rolled back to the checkpoint of step {restored.step}; training goes on "
                    f"from batch {position + 1}, skipping the batches in between")
                return _placed(trainer, restored)
        raise TrainingDiverged(
            f"{nonfinite_limit} consecutive non-finite steps from step {first_bad_step} on and no "
            f"checkpoint before them to roll back to; lower the learning rate or check the data")

    guard = NonFiniteGuard(limit=nonfinite_limit, rollback=rollback, log=say)
    if checkpointer is not None:  # several processes agree on the stop step through orbax
        preemption.reached = checkpointer.reached_preemption

    class Position(Callback):
        """Global batches consumed, after each step: the key of the next checkpoint."""

        def on_step_end(self, step, state):
            nonlocal position
            position = step
            return False

    hooks = [Position(), preemption, *callbacks]
    for cb in hooks:
        cb.on_fit_start(trainer, state, start_step)
    result = None
    try:
        result = train_loop(
            trainer, state, data.batches(start_step), epoch_ends=epoch_ends,
            start_step=start_step, evaluate=evaluate if eval_data is not None else None,
            progress=progress, progress_every=progress_every, log=log,
            callbacks=[*hooks, _Checkpointing(checkpointer, save, epoch_ends,
                                              evaluated=eval_data is not None)]
            if checkpointer is not None else hooks,
            guard=guard, monitor=monitor, unit=_unit(data))
        if not result.stopped and not result.history and eval_data is not None:
            # resumed at the end: nothing left to train, still report where it ended
            metrics = evaluate(result.state)
            if metrics is None:  # a signal during it
                result.stopped = True
            else:
                result.history.append({"epoch": len(epoch_ends), "step": position,
                                       "train_loss": float("nan"), **metrics})
        if checkpointer is not None:
            with measure("checkpoint"):
                save(position, result.state)  # stopped early, or the end (a no-op if saved)
                checkpointer.close()
            checkpointer = None
    finally:
        if checkpointer is not None:  # an error: still finish the saves in flight
            checkpointer.close()
        goodput = monitor.close(position) if monitor is not None else None
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(FitResult)}
    run = Run(**fields, start_step=start_step,
              stopped_at=position if result.stopped else None, total_steps=total_steps,
              goodput=goodput, wall_seconds=time.perf_counter() - start)
    for cb in hooks:
        cb.on_fit_end(run)
    return run


class _Checkpointing(Callback):
    """Saves every `checkpoint_every` steps and at epoch ends (which, with evaluation, save after
    it, with its metrics)."""

    def __init__(self, checkpointer, save, epoch_ends, evaluated: bool):
        self.checkpointer, self.save, self.epoch_ends = checkpointer, save, set(epoch_ends)
        self.evaluated = evaluated

    def on_step_end(self, step, state):
        at_epoch_end = step in self.epoch_ends
        if (self.checkpointer.due(step) and not at_epoch_end) or (
                at_epoch_end and not self.evaluated):
            self.save(step, state)
        return False


def _epoch_ends(data: Data, epochs: float | None, steps: int | None,
                eval_every: int | None) -> list[int]:
    if epochs is None and steps is None:
        raise UsageError("fit needs epochs= or steps=")
    if epochs is not None and epochs <= 0:
        raise UsageError(f"epochs must be positive, got {epochs}")
    if steps is not None and steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise UsageError(f"eval_every must be at least 1, got {eval_every}")
    if epochs is None:
        epochs = steps * data.global_batch / len(data)
    ends = epoch_end_steps(len(data), data.global_batch, epochs)
    if steps is not None:
        ends = sorted({min(e, steps) for e in ends})
    if eval_every is not None:
        ends = sorted(set(range(eval_every, ends[-1], eval_every)) | {ends[-1]})
    return ends


def _with_masks(batches):
    """(batch, mask) -> the batch with its mask last: (*batch, mask), or batch["mask"]."""
    for batch, mask in batches:
        if isinstance(batch, dict):
            yield {**batch, "mask": mask}
        elif isinstance(batch, tuple):
            yield (*batch, mask)
        else:
            yield batch, mask


def _means(sums: dict[str, float], prefix: str) -> dict[str, float]:
    count = sums.get("count")
    named = (lambda k: f"{prefix}_{k}") if prefix else (lambda k: k)
    if not count:
        return {named(k): v for k, v in sums.items()}
    return {named(k): v / count for k, v in sums.items() if k != "count"}


def _resume(checkpointer, restore_step: int | None, trainer, state):
    """The `Restored` of the chosen step, else of the newest one all processes can read."""
    like, replicas_like = trainer.canonical(state), trainer.replicas(state)
    if restore_step is None or restore_step < 0:
        return checkpointer.resume(like, replicas_like=replicas_like)
    if restore_step not in checkpointer.all_steps():
        raise UsageError(f"no checkpoint of step {restore_step} in {checkpointer.directory}; "
                         f"it has {checkpointer.all_steps()}")
    return checkpointer.resume(like, replicas_like=replicas_like, step=restore_step)


def _placed(trainer, restored):
    """A restored state in the trainer's layout: each replica's own where they were saved."""
    if restored.replicas is not None:
        return trainer.place_replicas(restored.replicas)
    return trainer.place(restored.state)


def _check_same_data(saved: dict, now: dict, step: int) -> None:
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise UsageError(f"the checkpoint of step {step} was trained with {key} "
                             f"{saved[key]}, this run has {value}; resume with the same {key} "
                             f"or use another work dir")


def _unit(data) -> tuple[str, int]:
    """What the data's throughput counts (`Dataset.unit`): ("img", 1) unless it says."""
    return getattr(data, "unit", "img"), getattr(data, "units_per_example", 1)


def _monitor(logdir, start, profile_steps, hang_timeout, hang_action, peak_tflops, trainer,
             data, total_steps, run_meta):
    """The run's TrainMonitor, or None when there is neither a logdir nor a watchdog."""
    if not logdir and not hang_timeout:
        return None
    from jaxdist.observe.metrics import TrainMonitor

    meta = None
    if logdir:
        devices = trainer.devices
        meta = {"devices": len(devices), "platform": devices[0].platform,
                "strategy": trainer.strategy, "global_batch": data.global_batch,
                "steps": total_steps, **dict(run_meta or {})}
    return TrainMonitor(logdir, start=start, peak_tflops=peak_tflops,
                        profile_steps=profile_steps, hang_timeout=hang_timeout,
                        hang_action=hang_action, meta=meta, unit=_unit(data))
