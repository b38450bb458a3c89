"""`NonFiniteGuard`: what a run does about steps whose loss or gradients are not finite.

The step itself skips such an update (`metrics["nonfinite"]`); the guard counts them in a row and
at the limit asks for a rollback, which `fit` takes from the checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxdist.core.callback import Callback
from jaxdist.errors import UsageError


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """How many non-finite steps in a row a run tolerates."""

    nonfinite_limit: int = 20
    """after N consecutive skipped non-finite steps roll back to the last checkpoint before them
    (or stop without one); 0: only log them"""

    def validate(self) -> None:
        if self.nonfinite_limit < 0:
            raise UsageError(f"nonfinite_limit must be >= 0, got {self.nonfinite_limit}")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps and nothing to roll back to."""


class RollBack(Exception):
    """Raised by the guard out of `on_metrics`: go back to a checkpoint before `first_bad_step`.

    Training then goes on with the next batch: the window that produced non-finite values is
    skipped, not replayed (replaying it would fail the same way)."""

    def __init__(self, first_bad_step: int, limit: int):
        super().__init__(f"{limit} consecutive non-finite steps from step {first_bad_step} on")
        self.first_bad_step, self.limit = first_bad_step, limit


class NonFiniteGuard(Callback):
    """Counts consecutive skipped (non-finite) steps; at the limit raises `RollBack`."""

    def __init__(self, config: GuardConfig = GuardConfig(), log: Callable[[str], None] = print):
        self.limit, self.log = config.nonfinite_limit, log
        self.consecutive = 0
        self.skipped = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not metrics.get("nonfinite", 0.0):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        self.log(f"step {step}: non-finite loss or gradient, update skipped "
                 f"({self.consecutive} in a row)")
        if self.limit and self.consecutive >= self.limit:
            first_bad, self.consecutive = step - self.consecutive + 1, 0
            raise RollBack(first_bad, self.limit)
