"""Hang diagnosis and action: each process publishes its last completed step and phase (data /
step / eval / checkpoint) and a heartbeat to the JAX distributed key-value store (several
processes) and to a status file; when nothing progressed for `timeout` seconds the watchdog names
the process that is behind (a frozen one stops beating) and, with `action="exit"`, writes every
thread's Python stack and the verdict to the status dir and ends the process with `EXIT_HANG`, so
a launcher or scheduler restarts the job from its last checkpoint (jax-ml/jax#38503: a process
stuck in a collective gets no timeout of its own)."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax

from jaxdist.cluster import kv
from jaxdist.errors import EXIT_HANG

PHASES = ("startup", "data", "step", "eval", "checkpoint", "done")
KV_PREFIX = "jaxdist/status/"
KV_ANSWER_SECONDS = 5.0  # a key-value call that takes longer is given up (a frozen process 0)


def diagnose_hang(statuses: dict[int, dict], stalled_seconds: float,
                  expected: int | None = None, *, now: float | None = None,
                  silent_after: float | None = None) -> str:
    """One line naming the process(es) behind: a silent one, else the lowest step, then the
    phase that differs.

    `statuses`: process index -> {"step": last completed step, "phase": ..., "time": unix time of
    the last update, "beat": unix time of its watchdog's last publish}. `expected`: the process
    count (processes that never reported are named). A process whose beat is older than
    `silent_after` s at `now` is not responding (frozen, or dead with its heartbeat not yet
    missed by the runtime): it is the one behind, whatever its step.
    """
    head = f"no progress for {stalled_seconds:.0f} s"
    missing = sorted(set(range(expected or 0)) - set(statuses))
    if not statuses:
        return f"{head}; no process reported a status"
    if now is not None and silent_after is not None:
        silent = sorted(p for p, s in statuses.items()
                        if now - float(s.get("beat", now)) > silent_after)
        if silent and len(silent) < len(statuses):
            parts = [f"process {p} is not responding (last heard {now - statuses[p]['beat']:.0f} s "
                     f"ago, at step {statuses[p].get('step', '?')}, phase "
                     f"{statuses[p].get('phase', '?')})" for p in silent]
            text = f"{head}; " + "; ".join(parts)
            return text + (f"; process(es) {_names(missing)} never reported" if missing else "")
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
    """The key-value store when several processes run, else None."""
    return kv.client() if jax.process_count() > 1 else None


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
        self.completed_a_step = False
        self.path = (Path(logdir) / "status" / f"process_{self.process}.json") if logdir else None
        self._client = _kv_client()
        self._published = None

    def update(self, phase: str | None = None, step: int | None = None) -> None:
        if step is not None:
            self.completed_a_step = self.completed_a_step or step > self.step
            self.step = step
        if phase is not None:
            self.phase = phase
        self.changed = time.time()

    def as_dict(self) -> dict:
        return {"step": self.step, "phase": self.phase, "time": self.changed}

    def publish(self) -> None:
        """To the KV store every call (the beat says this process is alive), to the file when
        the status changed."""
        current = self.as_dict()
        if self._client is not None:
            try:
                self._client.key_value_set(f"{KV_PREFIX}{self.process}",
                                           json.dumps({**current, "beat": time.time()}),
                                           allow_overwrite=True)
            except Exception:  # the coordinator may be gone; the watchdog still reports locally
                pass
        if current == self._published:
            return
        self._published = current
        text = json.dumps(current)
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
        statuses[self.process] = {**self.as_dict(), "beat": time.time()}
        return statuses


class Watchdog:
    """A daemon thread: publishes the status every `interval` s and, when it has not changed for
    `timeout` s (3x that before the first step completed: compilation), diagnoses the stall with
    `diagnose_hang` of every process's status.

    `action="report"` logs the diagnosis (again every `timeout` s while the stall lasts);
    `action="exit"` logs it once as an error, writes `hang_process_<i>.txt` (the verdict and
    every thread's stack) to the status dir (to stderr without one) and exits with `EXIT_HANG`:
    the process is stuck, so only a restart from the last checkpoint helps.
    """

    def __init__(self, status: ProgressStatus, timeout: float, *, interval: float | None = None,
                 log: Callable[[str], None] | None = None, action: str = "report",
                 exit: Callable[[int], None] = os._exit):
        if action not in ("report", "exit"):
            raise ValueError(f"watchdog action {action!r}: expected 'report' or 'exit'")
        self.status, self.timeout, self.action = status, timeout, action
        self.interval = interval if interval is not None else max(0.05, min(5.0, timeout / 4))
        self.log = log or (lambda m: print(f"[process {status.process}] hang watchdog: {m}",
                                           file=sys.stderr, flush=True))
        self.messages: list[str] = []
        self._exit = exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxdist-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def allowance(self) -> float:
        """Seconds of no progress tolerated now: more before the first step (it compiles)."""
        return self.timeout if self.status.completed_a_step else 3 * self.timeout

    def check(self, now: float | None = None) -> str | None:
        """The diagnosis when stalled for `allowance()` s since the last report, else None."""
        now = time.time() if now is None else now
        stalled = now - self.status.changed
        last = getattr(self, "_reported", 0.0)
        if stalled < self.allowance() or now - last < self.timeout:
            return None
        self._reported = now
        statuses = _bounded(self.status.gather, KV_ANSWER_SECONDS)
        if statuses is None:  # the store lives in process 0: frozen or gone
            return (diagnose_hang({self.status.process: self.status.as_dict()}, stalled) +
                    "; process 0, which holds the job's key-value store, is not responding")
        return diagnose_hang(statuses, stalled, self.status.processes, now=now,
                             silent_after=max(3 * self.interval, min(self.timeout / 2, 10.0)))

    def _run(self) -> None:
        # Publish at once, then every interval: a process frozen before its first interval ended
        # (a fast machine reaches step 30 in under a second) must be named as not responding,
        # not as one that never reported.
        _bounded(self.status.publish, KV_ANSWER_SECONDS)
        while not self._stop.wait(self.interval):
            try:
                _bounded(self.status.publish, KV_ANSWER_SECONDS)
                message = self.check()
            except Exception as e:  # never take training down
                message = f"watchdog error: {e!r}"
                if self.action == "exit":
                    self.log(message)
                    continue
            if message:
                self.messages.append(message)
                if self.action == "exit":
                    self.give_up(message)
                    return
                self.log(message)

    def give_up(self, message: str) -> None:
        """Writes the verdict and every thread's stack, says so in one line, exits."""
        where = "stderr"
        try:
            if self.status.path is not None:
                path = self.status.path.parent / f"hang_process_{self.status.process}.txt"
                with open(path, "w") as f:
                    f.write(f"{message}\n\n")
                    f.flush()
                    faulthandler.dump_traceback(f, all_threads=True)
                where = str(path)
            else:
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
        except Exception as e:
            where = f"nowhere ({e!r})"
        print(f"error: hang: {message}; process {self.status.process} exits {EXIT_HANG} so the "
              f"job restarts from its last checkpoint (stacks: {where})", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        self._exit(EXIT_HANG)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.status.publish()
        except Exception:
            pass


def _bounded(fn: Callable[[], object], seconds: float):
    """`fn()`, or None when it has not returned within `seconds` (it goes on in the background:
    a call into a frozen coordinator must never stop the watchdog from acting)."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True,
                              name="jaxdist-watchdog-kv")
    worker.start()
    worker.join(seconds)
    return result[0] if result else None
