"""Hang diagnosis: each process publishes its last completed step and phase (data / step / eval /
checkpoint) to the JAX distributed key-value store (several processes) and to a status file;
the watchdog names the process that is behind when nothing progressed for `timeout` seconds."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax

PHASES = ("startup", "data", "step", "eval", "checkpoint", "done")
KV_PREFIX = "jaxdist/status/"


def diagnose_hang(statuses: dict[int, dict], stalled_seconds: float,
                  expected: int | None = None) -> str:
    """One line naming the process(es) behind: the lowest step, then the oldest update.

    `statuses`: process index -> {"step": last completed step, "phase": ..., "time": unix time of
    the last update}. `expected`: the process count (processes that never reported are named).
    """
    head = f"no progress for {stalled_seconds:.0f} s"
    missing = sorted(set(range(expected or 0)) - set(statuses))
    if not statuses:
        return f"{head}; no process reported a status"
    steps = {p: int(s.get("step", -1)) for p, s in statuses.items()}
    low = min(steps.values())
    behind = sorted(p for p, s in steps.items() if s == low)
    others = sorted(p for p in steps if p not in behind)
    phase = lambda p: statuses[p].get("phase", "?")  # noqa: E731
    if not others and len(behind) > 1:
        # all at the same step: the ones in a different phase than most, else the stalest
        phases = [phase(p) for p in behind]
        common = max(set(phases), key=phases.count)
        odd = [p for p in behind if phase(p) != common]
        if odd:
            behind, others = odd, [p for p in behind if p not in odd]
        else:
            parts = f"{head}; all {len(behind)} processes at step {low} (phase {common})"
            return parts + (f"; process(es) {_names(missing)} never reported" if missing else "")
    if not others and len(behind) == 1:  # one process: nobody to be behind of
        text = f"{head}; process {behind[0]} at step {low} (phase {phase(behind[0])})"
        return text + (f"; process(es) {_names(missing)} never reported" if missing else "")
    who = "process" if len(behind) == 1 else "processes"
    verb = "is" if len(behind) == 1 else "are"
    behind_phases = sorted({phase(p) for p in behind})
    text = (f"{head}; {who} {_names(behind)} {verb} behind at step {low} "
            f"(phase {'/'.join(behind_phases)})")
    if others:
        other_steps = sorted({steps[p] for p in others})
        at = (f"step {other_steps[0]}" if len(other_steps) == 1
              else f"steps {other_steps[0]}-{other_steps[-1]}")
        text += f", others at {at}"
    if missing:
        text += f"; process(es) {_names(missing)} never reported"
    return text


def _names(processes: list[int]) -> str:
    return ", ".join(str(p) for p in processes)


def _kv_client():
    """The distributed runtime's client when several processes run, else None."""
    if jax.process_count() <= 1:
        return None
    from jax._src import distributed

    return distributed.global_state.client


class ProgressStatus:
    """This process's last completed step and current phase, published to the KV store (several
    processes) and to `<logdir>/status/process_<i>.json`. Updates are attribute writes (free); the
    watchdog thread publishes them."""

    def __init__(self, logdir: str | os.PathLike | None = None):
        self.process = jax.process_index()
        self.processes = jax.process_count()
        self.step = 0
        self.phase = "startup"
        self.changed = time.time()  # last step completion or phase change
        self.path = (Path(logdir) / "status" / f"process_{self.process}.json") if logdir else None
        self._client = _kv_client()
        self._published = None

    def update(self, phase: str | None = None, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase
        self.changed = time.time()

    def as_dict(self) -> dict:
        return {"step": self.step, "phase": self.phase, "time": self.changed}

    def publish(self) -> None:
        current = self.as_dict()
        if current == self._published:
            return
        self._published = current
        text = json.dumps(current)
        if self._client is not None:
            try:
                self._client.key_value_set(f"{KV_PREFIX}{self.process}", text,
                                           allow_overwrite=True)
            except Exception:  # the coordinator may be gone; the watchdog still reports locally
                pass
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.path)

    def gather(self) -> dict[int, dict]:
        """Every process's last published status (from the KV store), this one's current one."""
        statuses: dict[int, dict] = {}
        if self._client is not None:
            try:
                for key, value in self._client.key_value_dir_get(KV_PREFIX):
                    statuses[int(key.rsplit("/", 1)[-1])] = json.loads(value)
            except Exception:
                pass
        statuses[self.process] = self.as_dict()
        return statuses


class Watchdog:
    """A daemon thread: publishes the status every `interval` s and, when it has not changed for
    `timeout` s, prints `diagnose_hang` of every process's status (again every `timeout` s while
    the stall lasts). XLA's own collective timeouts may abort a hung collective first."""

    def __init__(self, status: ProgressStatus, timeout: float, *, interval: float | None = None,
                 log: Callable[[str], None] | None = None):
        self.status, self.timeout = status, timeout
        self.interval = interval if interval is not None else max(0.05, min(5.0, timeout / 4))
        self.log = log or (lambda m: print(f"[process {status.process}] hang watchdog: {m}",
                                           file=sys.stderr, flush=True))
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxdist-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def check(self, now: float | None = None) -> str | None:
        """The diagnosis when stalled for `timeout` s since the last report, else None."""
        now = time.time() if now is None else now
        stalled = now - self.status.changed
        last = getattr(self, "_reported", 0.0)
        if stalled < self.timeout or now - last < self.timeout:
            return None
        self._reported = now
        return diagnose_hang(self.status.gather(), stalled, self.status.processes)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.status.publish()
                message = self.check()
            except Exception as e:  # never take training down
                message = f"watchdog error: {e!r}"
            if message:
                self.messages.append(message)
                self.log(message)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.status.publish()
        except Exception:
            pass
