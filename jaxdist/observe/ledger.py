"""A ledger of the collectives in a compiled step: what is communicated, how often, how many bytes.

It reads the partitioned HLO (`jax.jit(f).lower(...).compile().as_text()`), so it counts what XLA
will really run, after sharding propagation and fusion, not what the code seems to ask for.

Bytes are per device and per step:
- `payload`: the logical buffer each collective works on: the reduced buffer (all-reduce), the
  gathered result (all-gather), the input before scattering (reduce-scatter), the exchanged buffer
  (all-to-all), the sent buffer (collective-permute).
- `wire`: what a ring algorithm sends per device for that payload over a group of N:
  all-reduce 2(N-1)/N, all-gather and reduce-scatter (N-1)/N, all-to-all (N-1)/N,
  collective-permute 1. It is a model (bandwidth-optimal rings), not a measurement.

Collectives inside a `while` body are multiplied by the loop's known trip count when the HLO
records one (`known_trip_count`); otherwise they are counted once and `unknown_trip_counts` says
so.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(KINDS)
    + r")(?P<async>-start)?\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-%, ]+)")


@dataclasses.dataclass
class Collective:
    """One kind of collective over one group size, summed over a step."""

    kind: str
    group_size: int
    count: int = 0
    payload_bytes: int = 0

    @property
    def wire_bytes(self) -> float:
        return self.payload_bytes * wire_factor(self.kind, self.group_size)


@dataclasses.dataclass
class Ledger:
    collectives: list[Collective]
    unknown_trip_counts: int = 0

    def total(self, kind: str | None = None, *, wire: bool = False) -> float:
        chosen = [c for c in self.collectives if kind is None or c.kind == kind]
        return sum(c.wire_bytes if wire else c.payload_bytes for c in chosen)

    def count(self, kind: str | None = None) -> int:
        return sum(c.count for c in self.collectives if kind is None or c.kind == kind)


def wire_factor(kind: str, n: int) -> float:
    """Bytes a ring sends per device, per payload byte, over a group of `n`."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n
    if kind == "collective-permute":
        return 1.0
    return (n - 1) / n


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (a tuple's elements summed)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _SHAPE.findall(text))


def group_size(attrs: str, num_devices: int | None = None) -> int:
    """The size of each replica group, from any of the HLO spellings of `replica_groups`."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = {k.strip("'\" "): int(v) for k, v in re.findall(r"([^,=]+)=(\d+)", mesh.group(1))}
        # an axis, or a sub-axis 'name':(size before)size
        axes = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", mesh.group(2))
        return math.prod(int(sub) if sub else sizes[name] for name, _, sub in axes)
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if listed:
        return len([d for d in listed.group(1).split(",") if d.strip()])
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", attrs)
    if pairs:
        return 2
    return num_devices or 1


def _payload(kind: str, async_start: bool, result: str, n: int) -> int:
    if async_start and kind in ("all-gather", "collective-permute"):
        shapes = _SHAPE.findall(result)  # ((operand), result[, contexts]): take the result
        if len(shapes) >= 2:
            dtype, dims = shapes[1]
            return _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    size = shape_bytes(result)
    return size * n if kind == "reduce-scatter" else size


def _multiplicities(hlo: str) -> tuple[dict[str, int], int]:
    """How many times each computation runs per step, and how many loops had no trip count."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    entry, current, unknown = None, None, 0
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group("name")
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        loop = _WHILE.search(line)
        if loop:
            trip = _TRIP.search(line)
            unknown += trip is None
            calls[current].append((loop.group("body"), int(trip.group(1)) if trip else 1))
        for group in _CALLS.findall(line):
            for callee in re.split(r"[,\s]+", group.replace("%", "")):
                if callee and not (loop and callee == loop.group("body")):
                    calls[current].append((callee, 1))
    times: dict[str, int] = defaultdict(int)

    def visit(name: str, factor: int, depth: int = 0) -> None:
        if depth > 64:
            return
        times[name] += factor
        for callee, n in calls.get(name, ()):
            visit(callee, factor * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return times, unknown


def collective_ledger(hlo: str, num_devices: int | None = None) -> Ledger:
    """The collectives of one run of the compiled program `hlo` (`compiled.as_text()`)."""
    times, unknown = _multiplicities(hlo)
    table: dict[tuple[str, int], Collective] = {}
    current = None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group("name")
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        kind = m.group("op")
        n = group_size(m.group("attrs"), num_devices)
        repeat = times.get(current, 1) if times else 1
        entry = table.setdefault((kind, n), Collective(kind, n))
        entry.count += repeat
        entry.payload_bytes += repeat * _payload(kind, bool(m.group("async")), m.group("shape"), n)
    order = {k: i for i, k in enumerate(KINDS)}
    rows = sorted(table.values(), key=lambda c: (order[c.kind], c.group_size))
    return Ledger(rows, unknown)


def ideal_dp_bytes(grad_bytes: float, n: int) -> float:
    """Wire bytes per device of data parallelism: one ring all-reduce of the gradients."""
    return grad_bytes * wire_factor("all-reduce", n)


def ideal_fsdp_bytes(param_bytes: float, n: int) -> float:
    """Wire bytes per device of FSDP (ZeRO-3): all-gather the parameters for the forward and
    again for the backward pass, reduce-scatter the gradients: 3 (N-1)/N, 1.5x data parallelism.
    """
    return 3 * param_bytes * wire_factor("all-gather", n)


def ideal_all_to_all_bytes(tokens: int, top_k: int, embed: int, dtype_bytes: int,
                           group: int) -> float:
    """Wire bytes per device of one direction of an expert-parallel all-to-all dispatch: each of
    a device's `tokens` sent once per chosen expert, (group-1)/group of them to another device
    of its expert group of `group` (the same again to combine the outputs, and twice in the
    backward pass)."""
    return tokens * top_k * embed * dtype_bytes * wire_factor("all-to-all", group)


def format_ledger(ledger: Ledger) -> str:
    """A table: kind, group, count, payload MiB, ring wire MiB."""
    lines = [f"{'collective':<20} {'group':>5} {'count':>6} {'payload MiB':>12} {'wire MiB':>9}"]
    for c in ledger.collectives:
        lines.append(f"{c.kind:<20} {c.group_size:>5} {c.count:>6} "
                     f"{c.payload_bytes / 2**20:>12.3f} {c.wire_bytes / 2**20:>9.3f}")
    lines.append(f"{'total':<20} {'':>5} {ledger.count():>6} {ledger.total() / 2**20:>12.3f} "
                 f"{ledger.total(wire=True) / 2**20:>9.3f}")
    if ledger.unknown_trip_counts:
        lines.append(f"({ledger.unknown_trip_counts} loop(s) without a known trip count were "
                     f"counted once)")
    return "\n".join(lines)
