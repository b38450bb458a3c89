"""Start N local processes of one job on loopback, and restart the job when one fails or hangs.

    python -m jaxdist.launch --processes 2 --devices_per_process 4 -- \\
        python -m experiments.mnist --epochs 1 --workdir runs/a
    python -m jaxdist.launch -n 2 --devices_per_process 4 --max_restarts 5 --min_processes 1 \\
        -- python -m experiments.mnist --workdir runs/a

Each process gets JAXDIST_COORDINATOR (127.0.0.1 and a free port; the coordinator binds to
loopback only), JAXDIST_NUM_PROCESSES, JAXDIST_PROCESS_ID and JAXDIST_CPU_DEVICES; the command
calls `jaxdist.cluster.initialize()`, and JAX's runtime does the rest. Output lines are prefixed
with `[pN]`.

When a process fails with a status a restart may cure (all but the final ones of
`jaxdist.errors`: 2 = bad input and 65 = diverged would recur; an uncaught exception's 1, a
signal, 69 = a `TransientError` and 75 = the hang watchdog's are restarted), the others are
killed (SIGKILL: a process blocked in a collective may ignore SIGTERM) and, up to
`--max_restarts` times, all are started again: with a work dir they resume from the latest
checkpoint. A process that fails before it joined the job (a dead host) cannot start: with
`--min_processes M` below `--processes`, the job re-forms with the processes left (at least M),
which resume on the smaller mesh with the same global batches. SIGTERM or SIGINT to the launcher
is passed on (the processes save a checkpoint and exit 0) and nothing is restarted.

With `--bandwidth RATE` (tc's syntax: 1gbit, 100mbit) the processes run in a network namespace
of the job's own whose loopback carries at most RATE (`jaxdist.cluster.bandwidth`); a short
transfer first prints what it really gives, and the namespace is removed however the launcher
ends, SIGKILL included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jaxdist.cluster.bandwidth import LimitedLoopback, parse_rate
from jaxdist.cluster.distributed import (
    ENV_BIND,
    ENV_COORDINATOR,
    ENV_JOINED_FILE,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)
from jaxdist.errors import (
    EXIT_DIVERGED,
    EXIT_HANG,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
    restartable,
)
from jaxdist.config import ArgumentParser

ENV_SLOT = "JAXDIST_SLOT"  # the process's place in the original job: a host's name, for tests
ENV_RESTART = "JAXDIST_RESTART"  # how many times the job was restarted before this start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATUS_MEANING = {EXIT_USAGE: "bad input", EXIT_DIVERGED: "diverged",
                  EXIT_UNAVAILABLE: "unavailable", EXIT_HANG: "hang watchdog"}


def describe_status(code: int) -> str:
    """'status 3', 'signal SIGKILL', 'status 75 (hang watchdog)'."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}" + (f" ({STATUS_MEANING[code]})" if code in STATUS_MEANING else "")


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


class _Job:
    """One start of the job: a process per slot, on a fresh coordinator port."""

    def __init__(self, command, slots, devices_per_process, run_dir: Path, restart: int,
                 env: dict, port: int = 0):
        self.slots = slots
        port = port or free_port()
        self.children, self.pumps, self.joined = [], [], []
        for pid, slot in enumerate(slots):
            joined = run_dir / f"joined_{restart}_{slot}"
            child_env = {**env, ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_BIND: f"127.0.0.1:{port}",
                         ENV_NUM_PROCESSES: str(len(slots)), ENV_PROCESS_ID: str(pid),
                         ENV_SLOT: str(slot), ENV_RESTART: str(restart),
                         ENV_JOINED_FILE: str(joined), "JAXDIST_CPU_DEVICES":
                         str(devices_per_process), "PYTHONUNBUFFERED": "1"}
            try:
                proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
                self.stop()
                raise UsageError(f"cannot run {command[0]!r}: {e.strerror}") from None
            (run_dir / f"slot_{slot}.json").write_text(json.dumps(
                {"pid": proc.pid, "process_id": pid, "restart": restart}))
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{pid}] ", sys.stdout),
                                    daemon=True)
            pump.start()
            self.children.append(proc)
            self.pumps.append(pump)
            self.joined.append(joined)

    def failures(self) -> list[tuple[int, int, bool]]:
        """(slot, exit status, had joined the job) of each process that failed so far."""
        return [(slot, p.returncode, joined.exists())
                for slot, p, joined in zip(self.slots, self.children, self.joined)
                if p.poll() not in (None, 0)]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.children)

    def signal(self, sig) -> None:
        for p in self.children:
            if p.poll() is None:
                p.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGKILL)
        for p in self.children:
            p.wait()
        for t in self.pumps:
            t.join(timeout=5)


def launch(command: list[str], processes: int, devices_per_process: int, port: int = 0,
           env: dict | None = None, poll: float = 0.2, max_restarts: int = 0,
           min_processes: int | None = None, run_dir: str | os.PathLike | None = None,
           grace_seconds: float = 120.0, bandwidth: str | None = None) -> int:
    """Runs `command` as `processes` processes, restarting on failure; 0 or the failure's status.

    `run_dir` receives `slot_<i>.json` (the pid of each slot's current process) for tools that
    inject faults; by default a temporary directory. `bandwidth` (tc's syntax, e.g. "100mbit")
    runs the processes in a network namespace whose loopback carries at most that much.

    Raises:
        UsageError: a command that cannot be run, a `run_dir` that cannot be written; with
            `bandwidth`, a malformed rate, not root, no `ip`, `tc` or tbf qdisc.
    """
    min_processes = processes if min_processes is None else min_processes
    base = {**os.environ, **(env or {})}
    if bandwidth is not None:
        parse_rate(bandwidth)
        _check_runnable(command[0])  # inside the namespace `ip` would only exit 255
    if run_dir:
        _check_run_dir(Path(run_dir))
    own_dir = None if run_dir else tempfile.TemporaryDirectory(prefix="jaxdist-launch-")
    run_path = Path(run_dir or own_dir.name)
    slots, restart, stop_signal = list(range(processes)), 0, []
    net = None

    def forward(signum, frame):
        stop_signal.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if bandwidth is not None:
            net = LimitedLoopback(bandwidth)
            net.start()
            _say(net.probe_line())
        while True:
            job = _Job(net.wrap(command) if net else command, slots, devices_per_process,
                       run_path, restart, base, port if restart == 0 else 0)
            status, failures = _watch(job, poll, stop_signal, grace_seconds)
            if not failures or stop_signal:
                return status
            cause = "; ".join(f"process {job.slots.index(s)} (slot {s}) exited with "
                              f"{describe_status(c)}" + ("" if joined else " before joining")
                              for s, c, joined in failures)
            # before joining, a failure other than bad input or another process's absence (69)
            # means the slot cannot start (a dead host)
            lost = [s for s, c, joined in failures
                    if not joined and c not in (EXIT_USAGE, EXIT_UNAVAILABLE)]
            fatal = [c for s, c, joined in failures if not restartable(c) and s not in lost]
            if fatal:
                _say(f"{cause}; not restarted ({describe_status(fatal[0])} would recur)")
                return fatal[0]
            if restart >= max_restarts:
                _say(f"{cause}; stopping the others" + (
                    f" (restarts used up: {max_restarts})" if max_restarts else ""))
                return status
            if lost and min_processes < len(slots):
                left = [s for s in slots if s not in lost]
                if len(left) < min_processes:
                    _say(f"{cause}; {len(left)} process(es) left, fewer than --min_processes "
                         f"{min_processes}; giving up")
                    return status
                _say(f"slot(s) {', '.join(map(str, lost))} cannot start: re-forming the job "
                     f"with {len(left)} process(es)")
                slots = left
            restart += 1
            _say(f"restart {restart}/{max_restarts}: {cause}; starting {len(slots)} "
                 f"process(es) again")
    finally:
        if net is not None:
            net.close()  # after the job's processes: they are all stopped by now
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_dir is not None:
            own_dir.cleanup()


def _watch(job: _Job, poll: float, stop_signal: list, grace_seconds: float
           ) -> tuple[int, list]:
    """Waits until all exit 0, one fails, or the launcher is signalled; (status, failures)."""
    try:
        while job.running():
            if stop_signal:
                _say(f"got {signal.Signals(stop_signal[0]).name}: passing it on; the processes "
                     f"save and exit")
                job.signal(signal.SIGTERM)
                deadline = time.monotonic() + grace_seconds  # a fail-safe for a stuck process
                while job.running() and time.monotonic() < deadline:
                    time.sleep(poll)
                break
            failures = job.failures()
            if failures:
                return failures[0][1], failures
            time.sleep(poll)
        failures = job.failures()
        return (failures[0][1] if failures else 0), ([] if stop_signal else failures)
    finally:
        job.stop()


def _check_runnable(program: str) -> None:
    """`program` names an executable (a path, or a name on PATH); else a `UsageError`."""
    if shutil.which(program) is None:
        reason = ("Permission denied" if os.sep in program and os.path.exists(program)
                  else "No such file or directory")
        raise UsageError(f"cannot run {program!r}: {reason}")


def _check_run_dir(path: Path) -> None:
    """`path` is, or can become, a directory this process can write to; else a `UsageError`."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        shown = "" if existing == path else f" ({existing} is a file)"
        raise UsageError(f"--run_dir {path} is not a directory{shown}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--run_dir {path} cannot be used: {e.strerror or e}") from None


def _say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m jaxdist.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", "-n", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="virtual CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--max_restarts", type=int, default=0,
                        help="restart the whole job up to this many times when a process fails "
                             "or hangs (0: never)")
    parser.add_argument("--min_processes", type=int, default=0,
                        help="re-form the job with the processes left, down to this many, when "
                             "one cannot start (0: --processes, no re-forming)")
    parser.add_argument("--run_dir", default=None,
                        help="where slot_<i>.json records each slot's current pid (default: a "
                             "temporary directory)")
    parser.add_argument("--grace_seconds", type=float, default=120.0,
                        help="after passing on SIGTERM, SIGKILL what is still running this late")
    parser.add_argument("--bandwidth", default=None, metavar="RATE",
                        help="run the processes in a network namespace of their own whose "
                             "loopback carries at most RATE, in tc's syntax (1gbit, 100mbit, "
                             "500kbit; needs root, ip and tc)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; put it after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be at least 1")
    if args.max_restarts < 0:
        parser.error("--max_restarts must be >= 0")
    if not 0 <= args.min_processes <= args.processes:
        parser.error(f"--min_processes must be between 1 and --processes ({args.processes})")
    try:
        return launch(command, args.processes, args.devices_per_process, args.port,
                      max_restarts=args.max_restarts, min_processes=args.min_processes or None,
                      run_dir=args.run_dir, grace_seconds=args.grace_seconds,
                      bandwidth=args.bandwidth)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
