"""`Callback`: the one way anything takes part in a training run.

`fit`'s own services (checkpointing, evaluation, the non-finite guard, preemption, progress and
the monitor) are callbacks built from their own configs, so a user's hook sees exactly what they
see. Every method runs on every process; only the leader should print.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override what you need; every hook is optional. In the order a run calls them:

    - `on_fit_start(trainer, state, step)`: before the first step (`step`: steps already done,
      > 0 after a resume).
    - `on_epoch_start(epoch, epochs, step)`: epoch `epoch` of `epochs` begins after `step` steps.
    - `on_first_step(step, seconds, state, batch)`: the run's first step (number `step`) is done,
      in `seconds` (mostly compilation); `batch` is its sharded batch.
    - `on_step_end(step, state) -> bool`: after step `step` was dispatched; `state` is on the
      devices (reading it waits for the step). True asks the run to stop: it saves (with a work
      dir) and returns.
    - `on_metrics(step, metrics)`: step `step`'s metrics as Python floats, read one step late so
      the host never stalls the devices.
    - `on_epoch_end(record, state) -> bool`: the epoch's record (a dict: epoch, step,
      train_loss, epoch_seconds, images_per_second, ...); services add to it (the evaluation
      its metrics, listed in `record["eval_keys"]`). True stops the run.
    - `on_eval(step, metrics)`: after each evaluation.
    - `on_fit_end(run)`: with the `Run`, also when it stopped early (not after an error).

    A callback that holds resources (a checkpoint manager, a watchdog thread) is also a context
    manager: `fit` enters it before the first hook and exits it however the run ends.
    """

    def on_fit_start(self, trainer: Any, state: Any, step: int) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, step: int) -> None: ...

    def on_first_step(self, step: int, seconds: float, state: Any, batch: Any) -> None: ...

    def on_step_end(self, step: int, state: Any) -> bool | None: ...

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, record: dict, state: Any) -> bool | None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, run: Any) -> None: ...


def throughput_key(unit: str) -> str:
    """The record key of a throughput in `unit` per second: "images_per_second" for "img" (every
    record has it: examples per second), else "<unit>_per_second" (e.g. "tokens_per_second")."""
    return "images_per_second" if unit == "img" else f"{unit}_per_second"
