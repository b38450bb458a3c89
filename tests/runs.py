"""A training process whose output a test acts on: signal it at a step reached, never after a delay.

Runs print a plain progress line per step (`--progress_every 0`), so "step 57/240" is an event a
test can wait for. Every wait also has a generous fail-safe limit, which only turns a hung run
into a failure; no test's outcome depends on how fast the machine is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

from conftest import REPO

STEP_LINE = re.compile(r"\| step (\d+)/(\d+)")
FAIL_SAFE_SECONDS = 600

# what every run a test interrupts passes: a progress line per step, nothing else on a timer
STEP_EVENTS = ["--progress", "true", "--progress_every", "0"]


class Run:
    """`python -m <module> <args>` (or `python <args>` with module=None) with its output
    (stdout + stderr) read line by line."""

    def __init__(self, args, *, env=None, module="experiments.mnist", cwd=REPO):
        command = [sys.executable, *args] if module is None else [sys.executable, "-m", module,
                                                                   *args]
        self.proc = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with self.proc.stdout:  # closed at the end of the output: no pipe left to the collector
            for line in self.proc.stdout:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, what: str, timeout: float = FAIL_SAFE_SECONDS):
        """The first line for which `predicate(line)` is truthy; its value."""
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = predicate(line)
                    if found:
                        return found
                seen = len(self.lines)
                if self.ended:
                    raise AssertionError(f"the run ended before {what}:\n{self.output[-3000:]}")
                if not self._changed.wait(timeout):
                    raise AssertionError(f"no {what} within {timeout} s (hung?):\n"
                                         f"{self.output[-3000:]}")

    def wait_for_text(self, text: str) -> str:
        return self.wait_for(lambda line: line if text in line else None, repr(text))

    def wait_for_step(self, step: int) -> int:
        """Blocks until the run reports step >= `step`; the step it reported."""
        def reached(line):
            m = STEP_LINE.search(line)
            return int(m.group(1)) if m and int(m.group(1)) >= step else None

        return self.wait_for(reached, f"step {step}")

    def steps_reported(self) -> list[int]:
        return [int(m.group(1)) for m in map(STEP_LINE.search, self.lines) if m]

    def send(self, sig) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = FAIL_SAFE_SECONDS) -> tuple[int, str]:
        """(exit status, whole output); a run still alive after `timeout` is killed and fails."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._reader.join(timeout=30)
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.output[-3000:]}")
        self._reader.join(timeout=30)
        return self.proc.returncode, self.output

    def act_at_step(self, step: int, act) -> tuple[int, str]:
        """Waits for step `step`, calls `act()` (a signal, a fault), then `finish()`; the run is
        killed on the way out whatever happens."""
        try:
            self.wait_for_step(step)
            act()
            return self.finish()
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
