"""`Evaluation`: the trainer's `eval_fn` over the evaluation data at every epoch end."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxdist.core.callback import Callback
from jaxdist.errors import UsageError
from jaxdist.train.loop import unmeasured
from jaxdist.train.preemption import Preemption


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """When and on how much a run evaluates, and what it names the metrics."""

    every: int = dataclasses.field(default=0, metadata={"flag": "eval_every"})
    """evaluate every N steps instead of at epoch ends (0: at epoch ends), and at the end"""
    batch: int = dataclasses.field(default=0, metadata={"flag": "eval_batch"})
    """examples per evaluation batch (0: the evaluation data's own global batch)"""
    examples: int = dataclasses.field(default=0, metadata={"flag": "eval_examples"})
    """evaluate on the first N examples (0: all)"""
    prefix: str = dataclasses.field(default="test", metadata={"flag": "eval_prefix"})
    """the metrics are reported as <prefix>_<name> (test_accuracy, val_loss, ...)"""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                meaning = "all" if f.name == "examples" else "the default"
                raise UsageError(f"{f.metadata['flag']} must be >= 0 (0: {meaning}), got {value}")


def eval_means(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """`eval_fn`'s sums -> the reported metrics: with a "count", the others as means; named
    `<prefix>_<name>`."""
    count = sums.get("count")
    named = (lambda k: f"{prefix}_{k}") if prefix else (lambda k: k)
    if not count:
        return {named(k): v for k, v in sums.items()}
    return {named(k): v / count for k, v in sums.items() if k != "count"}


class Evaluation(Callback):
    """Evaluates at each epoch end; its metrics join the epoch record (and the checkpoint saved
    there). A signal during it stops the run (one process: between batches)."""

    def __init__(self, config: EvalConfig, data: Any, trainer: Any, *,
                 preemption: Preemption | None = None,
                 measure: Callable[[str], Any] | None = None):
        self.config, self.data, self.trainer = config, data, trainer
        self.preemption, self.measure = preemption, measure or unmeasured

    def evaluate(self, state: Any) -> dict[str, float] | None:
        """The metrics, or None when a signal interrupted it."""
        batches = _with_masks(self.data.eval_batches(self.config.batch or None,
                                                     limit=self.config.examples or None))
        if self.preemption is not None:
            batches = self.preemption.interruptible(batches)
        try:
            sums = self.trainer.evaluate(state, batches)
        except Preemption.Interrupted:
            return None
        return eval_means(sums, self.config.prefix)

    def on_epoch_end(self, record: dict, state: Any) -> bool:
        if record.get("stopped"):
            return False
        with self.measure("eval"):
            metrics = self.evaluate(state)
        if metrics is None:
            return True
        record.update(metrics)
        record["eval_keys"] = tuple(metrics)
        return False


def _with_masks(batches):
    """(batch, mask) -> the batch with its mask last: (*batch, mask), or batch["mask"]."""
    for batch, mask in batches:
        if isinstance(batch, dict):
            yield {**batch, "mask": mask}
        elif isinstance(batch, tuple):
            yield (*batch, mask)
        else:
            yield batch, mask
