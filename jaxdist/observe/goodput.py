"""Goodput: wall seconds split into categories (compile, step, eval, checkpoint, data, startup or
restart, other); goodput = productive step seconds / wall seconds."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class Goodput:
    """Accumulates wall seconds per category; `report()` gives the breakdown and the goodput.

    Categories: `compile` (the first step: compilation plus its run), `step` (productive steps),
    `eval`, `checkpoint` (saving; asynchronous saves count only their blocking part), `data` (time
    blocked in `next(batches)`), `startup` (start to the first step) or `restart` (the same when
    resuming from a checkpoint), and `other` (the rest of the wall time: host overhead).

    `measure` nests: time inside an inner measurement counts only to the inner category, so the
    parts never sum to more than the wall time. One thread measures (the training loop's).
    """

    CATEGORIES = ("compile", "step", "eval", "checkpoint", "data", "startup", "restart")

    def __init__(self, start: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock() if start is None else start
        self.seconds = dict.fromkeys(self.CATEGORIES, 0.0)
        self._stack: list[list] = []  # [category, start, seconds of nested measurements]

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds
        if self._stack:
            self._stack[-1][2] += seconds

    @contextlib.contextmanager
    def measure(self, category: str) -> Iterator[None]:
        if category not in self.seconds:
            raise ValueError(f"unknown goodput category {category!r}; one of {self.CATEGORIES}")
        frame = [category, self.clock(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = self.clock() - frame[1]
            self.seconds[category] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def report(self, now: float | None = None) -> dict[str, float]:
        """`wall_seconds`, `goodput` (step / wall) and `<category>_seconds` including `other`."""
        wall = (self.clock() if now is None else now) - self.start
        out = {"wall_seconds": wall, "goodput": self.seconds["step"] / wall if wall > 0 else 0.0}
        out.update({f"{k}_seconds": v for k, v in self.seconds.items()})
        out["other_seconds"] = max(0.0, wall - sum(self.seconds.values()))
        return out


def format_goodput(report: dict[str, float]) -> str:
    parts = [f"{k[:-8]} {v:.1f} s" for k, v in report.items()
             if k.endswith("_seconds") and k != "wall_seconds" and v >= 0.05]
    return (f"goodput {100 * report['goodput']:.1f}% of {report['wall_seconds']:.1f} s "
            f"({', '.join(parts)})")
