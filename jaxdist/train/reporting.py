"""`ProgressReport`: a progress bar per epoch (plain lines in a log file) and one line per epoch.

Only process 0 prints. Throughput leaves out the run's first step, which is mostly compilation.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax

from jaxdist.core.callback import Callback, throughput_key
from jaxdist.observe.monitor import ObserveConfig
from jaxdist.progress import Progress


class ProgressReport(Callback):
    """Shows `loss | <unit>/s` while an epoch runs and prints its record when it ends."""

    def __init__(self, config: ObserveConfig = ObserveConfig(), *, total_steps: int,
                 examples_per_step: int, unit: tuple[str, int] = ("img", 1),
                 log: Callable[[str], None] = print):
        self.total, self.per_step, (self.unit, self.per_example) = (total_steps,
                                                                    examples_per_step, unit)
        self.show = config.progress and jax.process_index() == 0
        self.every, self.log = config.progress_every, log
        self.bar: Progress | None = None
        self.loss = "-"
        self.clock, self.examples = time.perf_counter(), 0

    def on_epoch_start(self, epoch: int, epochs: int, step: int) -> None:
        self.bar = Progress(f"epoch {epoch}/{epochs}", total=self.total, done=step,
                            enabled=self.show, every=self.every)
        self.clock, self.examples = time.perf_counter(), 0

    def on_first_step(self, step: int, seconds: float, state: Any, batch: Any) -> None:
        self.clock, self.examples = time.perf_counter(), -self.per_step  # not counted

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.loss = f"{metrics['loss']:.4f}"

    def on_step_end(self, step: int, state: Any) -> None:
        self.examples += self.per_step
        elapsed = time.perf_counter() - self.clock
        speed = f"{self.examples * self.per_example / elapsed:,.0f}" if self.examples > 0 else "-"
        if self.bar is not None:
            self.bar.update(1, f"loss {self.loss} | {speed} {self.unit}/s")

    def on_epoch_end(self, record: dict, state: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log(format_record(record, record.get("eval_keys", ()), self.unit))


def format_record(r: dict, eval_keys: Sequence[str] = (), unit: str = "img") -> str:
    """The epoch line: train loss, the evaluation's metrics (`eval_keys` of `r`), throughput."""
    parts = [f"epoch {r['epoch']}", f"step {r['step']}", f"train loss {r['train_loss']:.4f}"]
    for key in eval_keys:
        value = r[key]
        shown = f"{100 * value:.2f}%" if "accuracy" in key else f"{value:.4f}"
        parts.append(f"{key.replace('_', ' ')} {shown}")
    parts.append(f"{r[throughput_key(unit)]:,.0f} {unit}/s")
    return " | ".join(parts)
