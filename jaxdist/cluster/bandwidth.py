"""A slow network on one machine: a job's own network namespace whose loopback carries at most a
given rate (`jaxdist.launch --bandwidth RATE`).

The job's processes run in a private network namespace (`ip netns exec NAME ...`) whose only
interface is its loopback, limited by a token-bucket qdisc: `tc qdisc add dev lo root tbf rate
RATE burst B latency L`. Every byte between the job's processes (the coordinator's RPCs, gloo's
collectives) goes through that one bucket: the limit is the job's total, both directions and all
pairs of processes together, as if every process sat behind one shared link. It limits bandwidth
only; there is no added delay (that needs `netem`, which this kernel lacks).

The namespace is created, and deleted, by a keeper process (`netns_helper.py keep`) in a session
of its own, which waits on a pipe from the launcher: however the launcher ends (done, crashed,
SIGTERM, SIGKILL), the pipe closes, and the keeper SIGKILLs what is left in the namespace and
deletes it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxdist.errors import UsageError

HELPER = Path(__file__).with_name("netns_helper.py")

# tc's rate units (case-insensitive): bits or bytes per second, SI or IEC multiples
RATE_UNITS = {
    **{f"{p}bit": m for p, m in (("", 1), ("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12),
                                 ("ki", 2**10), ("mi", 2**20), ("gi", 2**30), ("ti", 2**40))},
    **{f"{p}bps": 8 * m for p, m in (("", 1), ("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12),
                                     ("ki", 2**10), ("mi", 2**20), ("gi", 2**30),
                                     ("ti", 2**40))},
}
RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
# loopback's MTU (64 KiB) and its headers: the largest packet tbf must pass whole (it drops a
# packet larger than its bucket)
LO_PACKET = 65536 + 1024
QUEUE_PACKETS = 4  # the fewest the queue behind the bucket holds (see `tbf_parameters`)
# below this the queue of QUEUE_PACKETS such packets holds over 4 s: a good part of
# the runtime's heartbeat timeout (30 s) before any bandwidth matters
MIN_RATE = 500e3
MAX_RATE = 100e9  # loopback itself carries less: nothing to limit
BURST_SECONDS = 0.010  # >= one timer tick at HZ=100: late wake-ups do not cost the rate
MIN_LATENCY = 0.050  # a switch buffer's order of queueing at the higher rates
PROBE_SECONDS = 1.0
PROBE_MAX_BYTES = 128 << 20
PROBE_PACKETS = 4  # the fewest timed: at low rates loopback's 64 KiB packets make the flow lumpy


def parse_rate(text: str) -> int:
    """Bits per second of a rate in tc's syntax (`1gbit`, `100mbit`, `500kbit`, `12mbps` = bytes
    per second); a `UsageError` naming the flag otherwise. A unit is required: tc reads a bare
    number as bit/s, which is never what was meant."""
    m = RATE.fullmatch(text)
    if not m or m.group(2).lower() not in RATE_UNITS:
        if m and not m.group(2):
            raise UsageError(f"--bandwidth {text!r} has no unit: e.g. 100mbit (bits/s) or "
                             f"12mbps (bytes/s), as tc writes rates")
        raise UsageError(f"--bandwidth {text!r} is not a rate in tc's syntax: a number and a "
                         f"unit, e.g. 1gbit, 100mbit, 500kbit, 12mbps (bytes/s)")
    bits = float(m.group(1)) * RATE_UNITS[m.group(2).lower()]
    if not MIN_RATE <= bits <= MAX_RATE:
        raise UsageError(f"--bandwidth {text} is outside 500kbit..100gbit: below, one 64 KiB "
                         f"loopback packet alone takes over a second; above, loopback itself "
                         f"is slower")
    return round(bits)


def tbf_parameters(rate_bits: int) -> tuple[int, float]:
    """(burst in bytes, latency in seconds) of the tbf qdisc for `rate_bits`.

    The burst (the bucket) holds at least one whole loopback packet (tbf drops a larger one) and
    10 ms of traffic, so a late timer does not cost the rate. The latency bounds the queue behind
    the bucket: at least 4 loopback packets, so TCP keeps the link busy without a drop per packet
    (each costs a retransmission), and at least 50 ms, a switch buffer's order; no more, so a
    heartbeat never waits long behind a collective."""
    rate_bytes = rate_bits / 8
    burst = max(LO_PACKET, math.ceil(rate_bytes * BURST_SECONDS))
    latency = max(MIN_LATENCY, QUEUE_PACKETS * LO_PACKET / rate_bytes)
    return burst, latency


def format_rate(bits_per_second: float) -> str:
    """'97.3 Mbit/s', '1.02 Gbit/s': 3 significant digits (999.6e6 is '1 Gbit/s')."""
    rounded = float(f"{bits_per_second:.3g}")
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rounded >= scale:
            return f"{rounded / scale:.3g} {unit}"
    return f"{rounded:.3g} bit/s"


def _capabilities() -> int | None:
    """This process's effective capabilities, None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return None


CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


def missing_requirement() -> str | None:
    """What this machine lacks for a limited loopback, in one line; None when nothing is."""
    caps = _capabilities()
    needed = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
    if caps is None or caps & needed != needed:
        return ("--bandwidth needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN, for a network "
                "namespace and a qdisc); this process lacks them")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"--bandwidth needs `{tool}` (package {package}), which is not on PATH"
    return None


def host_addresses() -> list[str]:
    """The non-loopback addresses this host's name resolves to. gloo listens on the host name's
    address; inside the namespace they are put on its loopback, so it finds them there."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found = {info[4][0].split("%")[0] for info in infos}
    return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)


def transfer(total: int, skip: int = 0, prefix: Sequence[str] = ()) -> tuple[int, float]:
    """(bytes, seconds) of a TCP transfer of `total` bytes over 127.0.0.1, timed by the
    receiver after the first `skip` bytes; run under `prefix` (e.g. `ip netns exec NAME`)."""
    done = subprocess.run([*prefix, sys.executable, "-I", str(HELPER), "transfer", str(total),
                           str(skip)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise UsageError(f"--bandwidth: the transfer over loopback failed: "
                         f"{lines[-1] if lines else f'status {done.returncode}'}")
    timed, seconds = done.stdout.split()
    return int(timed), float(seconds)


class LimitedLoopback:
    """A network namespace of its own whose loopback carries at most `rate` (tc's syntax).

        with LimitedLoopback("100mbit") as net:
            subprocess.run(net.wrap(command))

    Raises:
        UsageError: a malformed rate; not root; no `ip`, `tc` or tbf qdisc.
    """

    def __init__(self, rate: str):
        self.asked = rate
        self.rate_bits = parse_rate(rate)
        self.burst, self.latency = tbf_parameters(self.rate_bits)
        self.name = f"jaxdist-{secrets.token_hex(4)}"
        self._keeper: subprocess.Popen | None = None
        self._ip = "ip"

    def __enter__(self) -> LimitedLoopback:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Creates the namespace (through its keeper); a `UsageError` saying what is missing."""
        missing = missing_requirement()
        if missing:
            raise UsageError(missing)
        self._ip = shutil.which("ip")
        self._keeper = subprocess.Popen(
            [sys.executable, "-I", str(HELPER), "keep", self._ip, shutil.which("tc"), self.name,
             str(self.rate_bits), str(self.burst), str(round(self.latency * 1e6)),
             *host_addresses()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        answer = self._keeper.stdout.readline().strip()
        self._keeper.stdout.close()
        if answer != "ready":
            self.close()
            raise UsageError(_explain(answer.removeprefix("error: ") or "the keeper died"))

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run inside the namespace (`ip` execs it: the pid stays the command's)."""
        return [self._ip, "netns", "exec", self.name, *command]

    def transfer(self, total: int, skip: int = 0) -> tuple[int, float]:
        """`transfer` inside the namespace, through its limited loopback."""
        return transfer(total, skip, self.wrap([]))

    def probe(self) -> float:
        """Bits per second a TCP transfer of about `PROBE_SECONDS` really gets, timed after the
        first bucket's worth (which passes at once) and over at least 2 loopback packets."""
        steady = min(max(round(self.rate_bits / 8 * PROBE_SECONDS), PROBE_PACKETS * LO_PACKET),
                     PROBE_MAX_BYTES)
        timed, seconds = self.transfer(self.burst + steady, skip=self.burst)
        return timed * 8 / max(seconds, 1e-9)

    def probe_line(self) -> str:
        """'bandwidth: asked 100mbit, measured 97.3 Mbit/s over loopback in netns jaxdist-…'."""
        return (f"bandwidth: asked {self.asked}, measured {format_rate(self.probe())} over "
                f"loopback in netns {self.name}")

    def close(self) -> None:
        """Ends the keeper's wait: it kills what is left in the namespace and deletes it."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        keeper.stdin.close()
        try:
            keeper.wait(timeout=120)  # fail-safe: processes stuck in the kernel are not waited on
        except subprocess.TimeoutExpired:
            pass


def _explain(error: str) -> str:
    """The keeper's failure as the one line the launcher prints."""
    if "qdisc kind is unknown" in error:
        return f"--bandwidth needs the kernel's tbf qdisc, which this kernel lacks ({error})"
    return f"--bandwidth could not set up the network namespace: {error}"
