"""What runs outside the launcher's process for `jaxdist.launch --bandwidth`: the keeper of the
job's network namespace, and the transfer that measures what its loopback gives.

Run by path with the standard library only (`python -I netns_helper.py ...`), never imported by
the launcher: it starts in milliseconds without importing jaxdist (and JAX), and the keeper must
not depend on the launcher, which it outlives when the launcher is killed.

    python -I netns_helper.py keep IP TC NAME RATE_BITS BURST_BYTES LATENCY_US [ADDRESS ...]
    ip netns exec NAME python -I netns_helper.py transfer TOTAL_BYTES SKIP_BYTES

`keep` creates namespace NAME (loopback up, the host name's ADDRESSes on it, a tbf qdisc),
answers `ready` or `error: <what failed>` on stdout, then waits for EOF on stdin: the launcher
holds the other end, and any ending of the launcher closes it, SIGKILL included. It then SIGKILLs
every process left in the namespace, deletes it and says so on stderr. Creating and deleting in
this one process leaves no window in which a namespace exists that nothing will delete.

`transfer` sends TOTAL_BYTES over a TCP connection on 127.0.0.1 and prints `BYTES SECONDS`: the
bytes received after the first SKIP_BYTES and the time they took, from the receiver's side.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20
END_SECONDS = 30.0  # fail-safe: a process that will not die (D state) is left, not waited on


def _run(*args: str) -> str | None:
    """None when the command succeeds, else the first line it printed (or its status)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        return f"{args[0]}: {e.strerror}"
    if done.returncode == 0:
        return None
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return text[0] if text else f"exited with status {done.returncode}"


def create(ip: str, tc: str, name: str, rate_bits: int, burst: int, latency_us: int,
           addresses: list[str]) -> str | None:
    """Namespace `name` with its loopback up and limited; None, or the step that failed and why."""
    steps = [(f"ip netns add {name}", [ip, "netns", "add", name]),
             ("ip link set lo up", [ip, "-n", name, "link", "set", "lo", "up"])]
    for address in addresses:
        prefix = "/128" if ":" in address else "/32"
        steps.append((f"ip addr add {address}", [ip, "-n", name, "addr", "add",
                                                 address + prefix, "dev", "lo"]))
    steps.append(("tc qdisc add dev lo root tbf",
                  [ip, "netns", "exec", name, tc, "qdisc", "add", "dev", "lo", "root", "tbf",
                   "rate", f"{rate_bits}bit", "burst", f"{burst}b",
                   "latency", f"{latency_us}us"]))
    for what, args in steps:
        error = _run(*args)
        if error is not None:
            return f"{what}: {error}"
    return None


def _pids(ip: str, name: str) -> set[int]:
    """The processes in namespace `name` (zombies excluded: they hold no namespace)."""
    done = subprocess.run([ip, "netns", "pids", name], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    return {int(p) for p in done.stdout.split() if p.isdigit()} if done.returncode == 0 else set()


def end_processes(ip: str, name: str) -> int:
    """SIGKILLs every process in namespace `name` until none is left; how many there were.
    Repeated because a process may fork while the first ones die."""
    ended: set[int] = set()
    deadline = time.monotonic() + END_SECONDS
    while time.monotonic() < deadline:
        pids = _pids(ip, name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ended |= pids
        time.sleep(0.02)
    return len(ended)


class _Stop(Exception):
    """SIGTERM to the keeper: clean up now, as when the launcher ends."""


def _stop(signum, frame):
    raise _Stop


def keep(ip: str, tc: str, name: str, rate_bits: str, burst: str, latency_us: str,
         *addresses: str) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):  # the launcher's end decides
        signal.signal(sig, signal.SIG_IGN)
    error = create(ip, tc, name, int(rate_bits), int(burst), int(latency_us), list(addresses))
    try:
        print("ready" if error is None else f"error: {error}", flush=True)
        sys.stdout.close()
    except BrokenPipeError:  # the launcher is gone already
        pass
    if error is None:
        signal.signal(signal.SIGTERM, _stop)
        try:
            while sys.stdin.buffer.read(CHUNK):  # until EOF: the launcher ended, however it did
                pass
        except _Stop:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ended = end_processes(ip, name)
    _run(ip, "netns", "delete", name)
    if error is None:
        left = f"; ended {ended} process(es) left in it" if ended else ""
        try:
            print(f"[launch] network namespace {name} removed{left}", file=sys.stderr, flush=True)
        except (BrokenPipeError, ValueError):
            pass
    return 0 if error is None else 1


def transfer(total: int, skip: int) -> tuple[int, float]:
    """(bytes, seconds): `total` bytes over TCP on 127.0.0.1, timed at the receiver from the
    first moment more than `skip` bytes had arrived (0: from the first byte)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def send():
            block, left = memoryview(bytes(CHUNK)), total
            with socket.create_connection(("127.0.0.1", port)) as s:
                while left:
                    s.sendall(block[:min(left, CHUNK)])
                    left -= min(left, CHUNK)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        conn, _ = server.accept()
        with conn:
            buffer, got, start = bytearray(CHUNK), 0, None
            while got < total:
                n = conn.recv_into(buffer)
                if not n:
                    break
                got += n
                if start is None and got > skip:
                    start = (time.perf_counter(), got)
            end = time.perf_counter()
        sender.join()
    if start is None or got < total:
        raise SystemExit(f"the transfer ended after {got} of {total} bytes")
    return got - start[1], end - start[0]


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "keep":
        return keep(*args)
    if command == "transfer":
        timed, seconds = transfer(int(args[0]), int(args[1]))
        print(timed, seconds)
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
