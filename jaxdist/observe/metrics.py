"""Metrics, goodput, MFU and hang diagnosis for a training run.

- `MetricsWriter(logdir)`: `metrics.jsonl` (one JSON object per record: `kind`, `step`, `time`
  (Unix seconds), then the values) and TensorBoard event files (tensorboardX scalars, tag
  `kind/name`). Only process 0 writes; on the others it does nothing.
- `Goodput`: wall seconds split into categories (compile, step, eval, checkpoint, data, startup or
  restart, other); goodput = productive step seconds / wall seconds.
- `flops_per_step` / `default_peak_tflops` / MFU: FLOPs of the compiled step from XLA's
  `cost_analysis()` (per device: the compiled module is one device's program) times steps per
  second, over a peak that is an assumption (a flag, or a per-platform default printed as such).
- `ProgressStatus` / `Watchdog` / `diagnose_hang`: each process publishes its last completed step
  and phase (data / step / eval / checkpoint) to the JAX distributed key-value store (several
  processes) and to a status file; the watchdog names the process that is behind when nothing
  progressed for `timeout` seconds.
- `TrainMonitor`: all of the above behind the few hooks `jaxdist.train.loop.fit` calls.

Nothing here blocks on a step still running: `fit` hands over a step's metrics when it reads them
anyway (one step late), and step times are the intervals between those reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from jaxdist.cluster.devices import XLA_OWN_CPU_KERNELS

PHASES = ("startup", "data", "step", "eval", "checkpoint", "done")
KV_PREFIX = "jaxdist/status/"


# ------------------------------------------------------------------------------------ writer


class MetricsWriter:
    """Writes records to `<logdir>/metrics.jsonl` and TensorBoard event files in `logdir`.

    Only process 0 writes (`enabled` defaults to that); elsewhere every method is a no-op. Records
    append, so a resumed run with the same logdir continues the same file (its `meta` record marks
    the restart).
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None,
                 tensorboard: bool = True):
        self.logdir = Path(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.logdir / "metrics.jsonl", "a", buffering=1 << 16)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # metrics.jsonl alone; the `observe` extra adds event files
                print(f"note: tensorboardX is not installed (pip install 'jaxdist[observe]'); "
                      f"writing only {self.logdir / 'metrics.jsonl'}", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(self.logdir), flush_secs=10)

    def write(self, kind: str, step: int, values: dict[str, Any], *, scalars: bool = True) -> None:
        """One record; its numeric values also become TensorBoard scalars `kind/name`."""
        if not self.enabled:
            return
        now = time.time()
        record = {"kind": kind, "step": int(step), "time": now, **_jsonable(values)}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and scalars:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                        math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, int(step), walltime=now)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf
        out[key] = value
    return out


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (or of `<dir>/metrics.jsonl`, `<dir>/logs/metrics.jsonl`)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "metrics.jsonl", path / "logs" / "metrics.jsonl"):
            if candidate.exists():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"no metrics.jsonl in {path} or {path / 'logs'}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ goodput


class Goodput:
    """Accumulates wall seconds per category; `report()` gives the breakdown and the goodput.

    Categories: `compile` (the first step: compilation plus its run), `step` (productive steps),
    `eval`, `checkpoint` (saving; asynchronous saves count only their blocking part), `data` (time
    blocked in `next(batches)`), `startup` (start to the first step) or `restart` (the same when
    resuming from a checkpoint), and `other` (the rest of the wall time: host overhead).

    `measure` nests: time inside an inner measurement counts only to the inner category, so the
    parts never sum to more than the wall time. One thread measures (the training loop's).
    """

    CATEGORIES = ("compile", "step", "eval", "checkpoint", "data", "startup", "restart")

    def __init__(self, start: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock() if start is None else start
        self.seconds = dict.fromkeys(self.CATEGORIES, 0.0)
        self._stack: list[list] = []  # [category, start, seconds of nested measurements]

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += seconds
        if self._stack:
            self._stack[-1][2] += seconds

    @contextlib.contextmanager
    def measure(self, category: str) -> Iterator[None]:
        if category not in self.seconds:
            raise ValueError(f"unknown goodput category {category!r}; one of {self.CATEGORIES}")
        frame = [category, self.clock(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = self.clock() - frame[1]
            self.seconds[category] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def report(self, now: float | None = None) -> dict[str, float]:
        """`wall_seconds`, `goodput` (step / wall) and `<category>_seconds` including `other`."""
        wall = (self.clock() if now is None else now) - self.start
        out = {"wall_seconds": wall, "goodput": self.seconds["step"] / wall if wall > 0 else 0.0}
        out.update({f"{k}_seconds": v for k, v in self.seconds.items()})
        out["other_seconds"] = max(0.0, wall - sum(self.seconds.values()))
        return out


def format_goodput(report: dict[str, float]) -> str:
    parts = [f"{k[:-8]} {v:.1f} s" for k, v in report.items()
             if k.endswith("_seconds") and k != "wall_seconds" and v >= 0.05]
    return (f"goodput {100 * report['goodput']:.1f}% of {report['wall_seconds']:.1f} s "
            f"({', '.join(parts)})")


# ------------------------------------------------------------------------------------ MFU


def flops_per_step(compiled: Any, lowered: Any = None) -> float | None:
    """FLOPs of one run of a compiled step from `compiled.cost_analysis()` (a dict, or a list of
    dicts in older JAX: summed), or None when XLA gives none. For SPMD-partitioned, shard_map and
    pmap steps it is one device's program, i.e. FLOPs per device.

    XLA counts nothing inside oneDNN calls (on CPU, jaxdist's default for convolutions): given
    the `lowered` step, such a program is compiled once more with XLA's own kernels and counted.
    """
    if lowered is not None and "__onednn$" in compiled.as_text():
        compiled = lowered.compile(compiler_options=XLA_OWN_CPU_KERNELS)
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if analysis is None:
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    total = sum(float(a.get("flops", 0.0)) for a in analysis if a)
    return total if total > 0 else None


# dense bf16 (accelerators) peak TFLOP/s per chip; a CPU core is assumed to do 0.1 TFLOP/s (fp32
# FMAs on 512-bit vectors at ~3 GHz), shared by the virtual devices of the process
_GPU_PEAKS = (("B200", 2250.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
              ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0))
_TPU_PEAKS = (("v6", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0),
              ("v3", 123.0), ("v2", 45.0))
CPU_CORE_TFLOPS = 0.1


def default_peak_tflops(device: Any = None) -> tuple[float, str]:
    """(assumed peak TFLOP/s per device, a sentence saying where it comes from)."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "gpu":
        for name, peak in _GPU_PEAKS:
            if name.lower() in kind.lower():
                return peak, f"{kind}: {peak:g} TFLOP/s dense bf16 (datasheet)"
        return 100.0, f"{kind}: unknown GPU, 100 TFLOP/s assumed"
    if device.platform == "tpu":
        for name, peak in _TPU_PEAKS:
            if name in kind.lower():
                return peak, f"{kind}: {peak:g} TFLOP/s bf16 (datasheet)"
        return 200.0, f"{kind}: unknown TPU, 200 TFLOP/s assumed"
    cores = os.cpu_count() or 1
    local = max(1, jax.local_device_count())
    peak = CPU_CORE_TFLOPS * cores / local
    return peak, (f"cpu: {CPU_CORE_TFLOPS:g} TFLOP/s per core x {cores} cores shared by "
                  f"{local} devices = {peak:.3g} TFLOP/s per device")


def mfu(flops_per_device_step: float, steps_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s per device over the peak per device."""
    return flops_per_device_step * steps_per_second / (peak_tflops * 1e12)


def lowered_step(trainer: Any, state: Any, batch: Any) -> Any:
    """The lowered train step of a DataParallel or ShardedTrainer for these arguments."""
    lower = getattr(trainer, "lower", None) or trainer.backend.step.lower
    return lower(state, batch)


def compiled_step(trainer: Any, state: Any, batch: Any) -> Any:
    """The compiled train step of a DataParallel or ShardedTrainer for these arguments.

    After the first step has run this is a cache hit (milliseconds), not a second compilation.
    """
    return lowered_step(trainer, state, batch).compile()


# ------------------------------------------------------------------------------------ hangs


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


# ------------------------------------------------------------------------------------ monitor


def parse_step_range(text: str) -> tuple[int, int] | None:
    """'A,B' (or 'A-B', or 'A') -> (A, B) with 1 <= A <= B; '' -> None."""
    if not text:
        return None
    parts = text.replace("-", ",").split(",")
    try:
        first, last = int(parts[0]), int(parts[-1])
    except ValueError:
        raise ValueError(f"profile steps {text!r}: expected A,B (two step numbers)") from None
    if len(parts) > 2 or first < 1 or last < first:
        raise ValueError(f"profile steps {text!r}: expected A,B with 1 <= A <= B")
    return first, last


class TrainMonitor:
    """What `fit` reports to: metrics records, goodput, MFU, the profiler and the hang watchdog.

    Steps are numbered like checkpoints: step N is the N-th step (the state's step after it).

    Args:
        logdir: where metrics, event files, status files and profiles go (None: nothing written;
            goodput and the watchdog still work).
        start: `time.perf_counter()` at the start of the run (goodput's wall-clock origin).
        peak_tflops: peak TFLOP/s per device for MFU (0: `default_peak_tflops`).
        profile_steps: (A, B): trace steps A..B with `jax.profiler` into `<logdir>/profile`.
        hang_timeout: seconds without progress before the watchdog reports (0: no watchdog).
        meta: the run-metadata record (devices, strategy, global batch, model, ...).
        log: where the leader's one-line notes go (the MFU assumption, the goodput summary).
    """

    def __init__(self, logdir: str | os.PathLike | None = None, *, start: float | None = None,
                 peak_tflops: float = 0.0, profile_steps: tuple[int, int] | None = None,
                 hang_timeout: float = 0.0, meta: dict | None = None,
                 log: Callable[[str], None] = print, writer: MetricsWriter | None = None):
        self.logdir = Path(logdir) if logdir else None
        self.leader = jax.process_index() == 0
        self.writer = writer or (MetricsWriter(self.logdir) if self.logdir else None)
        self.goodput = Goodput(start)
        self.log = log if self.leader else (lambda _: None)
        self.peak_tflops, self.peak_note = ((peak_tflops, f"{peak_tflops:g} TFLOP/s per device "
                                             f"(--peak_tflops)") if peak_tflops
                                            else default_peak_tflops())
        self.flops: float | None = None
        self.compile_seconds = 0.0
        self.step_images = 0
        self.profile_steps = profile_steps
        if profile_steps and self.logdir is None:
            raise ValueError("profiling needs a logdir")
        self.profile_dir = None
        self._profiling = False
        self.status = ProgressStatus(self.logdir)
        self.watchdog = Watchdog(self.status, hang_timeout).start() if hang_timeout > 0 else None
        self._first_step = None
        self._last_read = None
        self._started = False
        if meta is not None:
            self.record("meta", 0, {**meta, "process_count": jax.process_count()})

    # -- writing
    def record(self, kind: str, step: int, values: dict, **kw) -> None:
        if self.writer is not None:
            self.writer.write(kind, step, values, **kw)

    def measure(self, category: str):
        return self.goodput.measure(category)

    def phase(self, phase: str, step: int | None = None) -> None:
        self.status.update(phase, step)

    # -- hooks called by fit
    def start_step(self, index: int, start_step: int) -> None:
        """Before step `index + 1` is dispatched (`index`: steps done so far)."""
        if not self._started:
            self._started = True
            before = self.goodput.clock() - self.goodput.start - sum(
                self.goodput.seconds.values())
            self.goodput.add("restart" if start_step else "startup", max(0.0, before))
            self.status.update(step=start_step)
        if self.profile_steps and index + 1 == self.profile_steps[0] and not self._profiling:
            self.profile_dir = self.logdir / "profile"
            if jax.process_count() > 1:
                self.profile_dir = self.profile_dir / f"process_{jax.process_index()}"
            jax.profiler.start_trace(str(self.profile_dir), create_perfetto_trace=True)
            self._profiling = True
        self.phase("step")

    def dispatched(self, index: int, metrics: Any) -> None:
        """After step `index + 1` was dispatched: ends a profile whose last step it is (waiting
        for it: a profile is worth one blocked step)."""
        if self._profiling and index + 1 >= self.profile_steps[1]:
            self.stop_profile(metrics)

    def stop_profile(self, wait_for: Any = None) -> None:
        if not self._profiling:
            return
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        jax.profiler.stop_trace()
        self._profiling = False
        self.log(f"profile of steps {self.profile_steps[0]}-{self.profile_steps[1]} in "
                 f"{self.profile_dir} (open with TensorBoard's profile plugin or Perfetto)")

    def first_step(self, step: int, seconds: float, trainer: Any, state: Any, batch: Any) -> None:
        """The first step (number `step`) ran in `seconds`; looks up its FLOPs and collectives."""
        self.compile_seconds, self._first_step = seconds, step
        self._last_read = time.perf_counter()
        self.status.update(step=step)
        if self.writer is None or not self.writer.enabled:
            return
        values: dict[str, Any] = {"compile_seconds": seconds}
        try:
            lowered = lowered_step(trainer, state, batch)
            compiled = lowered.compile()
        except Exception as e:  # an exotic backend: no MFU
            self.log(f"could not look up the compiled step ({e!r}); no MFU")
            compiled = None
        if compiled is not None:
            self.flops = flops_per_step(compiled, lowered)
            values["flops_per_device_step"] = self.flops or 0.0
            try:
                from jaxdist.observe.ledger import collective_ledger

                ledger = collective_ledger(compiled.as_text(), getattr(trainer, "num_devices",
                                                                         None))
                values["collective_bytes"] = ledger.total(wire=True)
                values["collective_payload_bytes"] = ledger.total()
            except Exception as e:
                self.log(f"no collective ledger ({e!r})")
        values["peak_tflops"] = self.peak_tflops
        self.record("compile", step, values)
        self.log(f"MFU assumes a peak of {self.peak_note}; set --peak_tflops to change it"
                 + ("" if self.flops else " (XLA gave no FLOP count: no MFU)"))

    def step_done(self, step: int, values: dict[str, float], images: int) -> None:
        """Step `step`'s metrics were read on the host (one step late)."""
        now = time.perf_counter()
        if step == self._first_step or self._last_read is None:
            seconds = self.compile_seconds
        else:
            seconds, self._last_read = now - self._last_read, now
        self.step_images = images or self.step_images
        self.status.update(step=step)
        if self.writer is None:
            return
        out = dict(values)
        out["step_seconds"] = seconds
        out["images_per_second"] = images / seconds if seconds > 0 else 0.0
        self.record("train", step, out)

    def epoch_end(self, record: dict) -> None:
        report = self.goodput.report()
        if self.writer is None:
            return
        step = record["step"]
        epoch = {k: v for k, v in record.items() if not k.startswith("test_") and k != "step"}
        epoch["compile_seconds"] = self.compile_seconds
        if self.flops and self.step_images and record.get("images_per_second"):
            steps_per_second = record["images_per_second"] / self.step_images
            epoch["mfu"] = mfu(self.flops, steps_per_second, self.peak_tflops)
        self.record("epoch", step, epoch)
        tests = {k: v for k, v in record.items() if k.startswith("test_")}
        if tests:
            self.record("eval", step, tests)
        self.record("goodput", step, report)
        self.writer.flush()

    def close(self, step: int | None = None) -> dict[str, float]:
        """Stops the profiler and watchdog, writes the final goodput; returns it."""
        self.stop_profile()
        self.phase("done", step)
        if self.watchdog is not None:
            self.watchdog.stop()
        report = self.goodput.report()
        if self.writer is not None:
            self.record("goodput", self.status.step if step is None else step,
                        {**report, "final": True})
            self.writer.close()
            self.log(format_goodput(report))
        return report
