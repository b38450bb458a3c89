"""Start N local processes of one job on loopback, for development and tests.

    python -m jaxdist.launch --processes 2 --devices_per_process 4 -- \\
        python -m experiments.mnist --epochs 1

Each process gets JAXDIST_COORDINATOR (127.0.0.1 and a free port; the coordinator binds to
loopback only), JAXDIST_NUM_PROCESSES, JAXDIST_PROCESS_ID and JAXDIST_CPU_DEVICES; the command
calls `jaxdist.cluster.initialize()`, and JAX's runtime does the rest. Output lines are prefixed
with `[pN]`. When one process fails, the others are killed (SIGKILL: a process blocked in a
collective may ignore SIGTERM) and the launcher exits with the failed process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxdist.cluster.distributed import ENV_BIND, ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def launch(command: list[str], processes: int, devices_per_process: int, port: int = 0,
           env: dict | None = None, poll: float = 0.2) -> int:
    """Runs `command` as `processes` processes; returns 0 or the first failure's exit status."""
    port = port or free_port()
    base = {**os.environ, **(env or {})}
    children, pumps = [], []
    for pid in range(processes):
        child_env = {**base, ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_BIND: f"127.0.0.1:{port}",
                     ENV_NUM_PROCESSES: str(processes), ENV_PROCESS_ID: str(pid),
                     "JAXDIST_CPU_DEVICES": str(devices_per_process), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        children.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{pid}] ", sys.stdout),
                                daemon=True)
        pump.start()
        pumps.append(pump)
    status = 0
    try:
        while [p.poll() for p in children].count(None):  # a list: poll every child
            failed = [(i, p.returncode) for i, p in enumerate(children)
                      if p.returncode not in (None, 0)]
            if failed:
                pid, status = failed[0]
                print(f"[launch] process {pid} exited with status {status}; stopping the others",
                      file=sys.stderr, flush=True)
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in children:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in children if p.returncode != 0), 0)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdist.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", "-n", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="virtual CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; put it after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be at least 1")
    return launch(command, args.processes, args.devices_per_process, args.port)


if __name__ == "__main__":
    sys.exit(main())
