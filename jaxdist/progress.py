"""Progress that reads well both on a terminal and in a log file.

On a terminal a tqdm bar redraws in place. Anywhere else (CI logs, `sbatch` output files, `| tee`)
a redrawn bar is one update per step, hundreds of MB over a long job, so progress becomes a plain
line at most every `every` seconds instead (and one at the end). `every=0` prints a line at every
update: one event per step that a supervising program (or a test) can act on.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

PLAIN_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether both output streams are terminals (tqdm draws on stderr, lines go to stdout)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class Progress:
    """`update(n, note)` as work is done; `close()` at the end.

    Args:
        label: what is progressing ("epoch 2/8", "decoding mnist/train").
        total: the position at the end; `done`: the position now.
        unit: what a position counts (lines say `step 57/240`).
        enabled: False prints nothing.
        every: seconds between plain lines off a terminal (0: every update).
        bar: force the tqdm bar (True) or plain lines (False); None: a bar on a terminal.
    """

    def __init__(self, label: str, *, total: int, done: int = 0, unit: str = "step",
                 enabled: bool = True, every: float = PLAIN_EVERY_SECONDS,
                 bar: bool | None = None, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.position, self.unit = label, total, done, unit
        self.enabled, self.every, self.clock, self.out = enabled, every, clock, out
        self._bar = None
        self._last_line = clock()
        if enabled and (on_terminal() if bar is None else bar):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total - done, desc=label, leave=False, unit=unit)

    def update(self, n: int = 1, note: str = "") -> None:
        self.position += n
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        if self.every and now - self._last_line < self.every and self.position < self.total:
            return
        self._last_line = now
        parts = [self.label, f"{self.unit} {self.position}/{self.total}", note]
        print(" | ".join(p for p in parts if p), file=self.out or sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
