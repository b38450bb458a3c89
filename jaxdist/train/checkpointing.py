"""`Checkpointing`: resume, save on a cadence and at evaluations, keep the best, roll back.

Checkpoints are asynchronous orbax saves under `<workdir>/checkpoints`; a rerun resumes from the
newest one every process can read (bitwise: global batch k depends only on (seed, k), the state
holds the RNG streams, and under local SGD each replica's own state is kept), and refuses one
whose data settings differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Literal

from jaxdist.core.callback import Callback
from jaxdist.errors import UsageError
from jaxdist.train.guard import RollBack, TrainingDiverged
from jaxdist.train.loop import unmeasured


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a run saves, what it keeps, and where it resumes."""

    workdir: str | None = None
    """directory for checkpoints; rerunning with it resumes (default: no checkpoints)"""
    every: int = dataclasses.field(default=500, metadata={"flag": "checkpoint_every"})
    """save a checkpoint every N steps (asynchronously)"""
    keep: int = dataclasses.field(default=3, metadata={"flag": "keep_checkpoints"})
    """how many checkpoints to keep"""
    keep_best: int = 0
    """also keep this many checkpoints with the best --best_metric"""
    best_metric: str | None = None
    """the evaluation metric keep-best ranks by (see --best_mode)"""
    best_mode: Literal["max", "min"] = "max"
    """keep-best keeps the highest --best_metric (max) or the lowest (min)"""
    restore_step: int = -1
    """resume from this checkpoint step (-1: the latest readable one)"""

    def validate(self) -> None:
        if self.every < 1 or self.keep < 1:  # also without a work dir: a typo
            raise UsageError("checkpoint_every and keep_checkpoints must be at least 1")
        if self.keep_best < 0:
            raise UsageError(f"keep_best must be >= 0, got {self.keep_best}")
        if self.best_mode not in ("max", "min"):
            raise UsageError(f"best_mode must be max or min, got {self.best_mode!r}")


class Checkpointing(Callback):
    """Saves every `every` steps and at each epoch end (after the evaluation, with its
    metrics), and once more where the run ends; `restore` resumes, `state_before` rolls back."""

    def __init__(self, config: CheckpointConfig, trainer: Any, *, data_meta: dict,
                 epoch_ends: tuple[int, ...], log: Callable[[str], None] = print,
                 measure: Callable[[str], Any] = unmeasured):
        from jaxdist.io import Checkpointer

        self.trainer, self.data_meta, self.epoch_ends = trainer, data_meta, set(epoch_ends)
        self.restore_step, self.log, self.measure = config.restore_step, log, measure
        self.checkpointer = Checkpointer(
            Path(config.workdir) / "checkpoints", every=config.every, keep=config.keep,
            keep_best=config.keep_best, best_metric=config.best_metric,
            best_mode=config.best_mode)
        self.position = 0  # global batches consumed: the key of the next checkpoint
        self.closed = False

    def restore(self, state: Any) -> tuple[Any, int]:
        """The state to start from and its step: the chosen checkpoint's, else the newest one
        every process can read, else `state` at 0."""
        restored = self._resume(state)
        if restored.step:
            _check_same_data(restored.meta, self.data_meta, restored.step)
            state = self._placed(restored)
            self.log(f"resuming at step {restored.step} from {self.checkpointer.directory}")
        self.position = restored.step
        return state, restored.step

    def reached_preemption(self, step: int) -> bool:
        """Whether the processes agreed to stop at `step` (orbax's preemption sync point)."""
        return self.checkpointer.reached_preemption(step)

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        with self.measure("checkpoint"):
            self.checkpointer.save(step, self.trainer.canonical(state),
                                   replicas=self.trainer.replicas(state),
                                   meta={**self.data_meta, "data_position": step},
                                   metrics=metrics)

    def state_before(self, rollback: RollBack) -> Any:
        """The newest checkpoint before the non-finite window, in the trainer's layout."""
        self.checkpointer.wait()
        fresh = self.trainer.init()
        restored = self.checkpointer.resume(self.trainer.canonical(fresh),
                                            replicas_like=self.trainer.replicas(fresh),
                                            below=rollback.first_bad_step)
        if not restored.step:
            raise TrainingDiverged(f"{rollback} and no checkpoint before them to roll back to; "
                                   f"lower the learning rate or check the data")
        self.log(f"rolled back to the checkpoint of step {restored.step}; training goes on "
                 f"from batch {self.position + 1}, skipping the batches in between")
        return self._placed(restored)

    def on_step_end(self, step: int, state: Any) -> bool:
        self.position = step
        if self.checkpointer.due(step) and step not in self.epoch_ends:
            self.save(step, state)
        return False

    def on_epoch_end(self, record: dict, state: Any) -> bool:
        metrics = {k: record[k] for k in record.get("eval_keys", ())}
        self.save(record["step"], state, metrics or None)
        return False

    def on_fit_end(self, run: Any) -> None:
        self.save(self.position, run.state)  # stopped early, or the end (a no-op if saved)
        self.close()

    def close(self) -> None:
        """Finishes the saves in flight (also after an error)."""
        if not self.closed:
            self.closed = True
            with self.measure("checkpoint"):
                self.checkpointer.close()

    def __enter__(self) -> "Checkpointing":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _resume(self, state: Any):
        like, replicas_like = self.trainer.canonical(state), self.trainer.replicas(state)
        step = self.restore_step
        if step is None or step < 0:
            return self.checkpointer.resume(like, replicas_like=replicas_like)
        if step not in self.checkpointer.all_steps():
            raise UsageError(f"no checkpoint of step {step} in {self.checkpointer.directory}; "
                             f"it has {self.checkpointer.all_steps()}")
        return self.checkpointer.resume(like, replicas_like=replicas_like, step=step)

    def _placed(self, restored: Any) -> Any:
        """A restored state in the trainer's layout: each replica's own where they were saved."""
        if restored.replicas is not None:
            return self.trainer.place_replicas(restored.replicas)
        return self.trainer.place(restored.state)


def _check_same_data(saved: dict, now: dict, step: int) -> None:
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise UsageError(f"the checkpoint of step {step} was trained with {key} "
                             f"{saved[key]}, this run has {value}; resume with the same {key} "
                             f"or use another work dir")
