"""`TrainMonitor`: metrics records, goodput, MFU, the profiler and the hang watchdog behind the
few hooks the training loop calls. Nothing here blocks on a step still running: the loop hands
over a step's metrics when it reads them anyway (one step late), and step times are the
intervals between those reads."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxdist.cluster.compile_cache import compiled_by_this_process_only
from jaxdist.observe.flops import default_peak_tflops, flops_per_step, lowered_step, mfu
from jaxdist.observe.goodput import Goodput, format_goodput
from jaxdist.observe.watchdog import ProgressStatus, Watchdog
from jaxdist.observe.writer import MetricsWriter


def throughput_key(unit: str) -> str:
    """The record key of a throughput in `unit` per second: "images_per_second" for "img" (every
    record has it: examples per second), else "<unit>_per_second" (e.g. "tokens_per_second")."""
    return "images_per_second" if unit == "img" else f"{unit}_per_second"


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
        hang_timeout: seconds without progress before the watchdog acts (0: no watchdog).
        hang_action: "exit" (stacks to the status dir, exit `EXIT_HANG`) or "report".
        meta: the run-metadata record (devices, strategy, global batch, model, ...).
        log: where the leader's one-line notes go (the MFU assumption, the goodput summary).
        unit: (name, count per example) the data's throughput is counted in: train and epoch
            records carry `throughput_key(name)` beside `images_per_second` (examples).
    """

    def __init__(self, logdir: str | os.PathLike | None = None, *, start: float | None = None,
                 peak_tflops: float = 0.0, profile_steps: tuple[int, int] | None = None,
                 hang_timeout: float = 0.0, hang_action: str = "exit",
                 meta: dict | None = None,
                 log: Callable[[str], None] = print, writer: MetricsWriter | None = None,
                 unit: tuple[str, int] = ("img", 1)):
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
        self.unit = unit
        self.profile_steps = profile_steps
        if profile_steps and self.logdir is None:
            raise ValueError("profiling needs a logdir")
        self.profile_dir = None
        self._profiling = False
        self.status = ProgressStatus(self.logdir)
        self.watchdog = (Watchdog(self.status, hang_timeout, action=hang_action).start()
                         if hang_timeout > 0 else None)
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
        try:  # process 0 alone compiles these: the other processes never meet them
            with compiled_by_this_process_only():
                lowered = lowered_step(trainer, state, batch)
                compiled = lowered.compile()
                self.flops = flops_per_step(compiled, lowered)
        except Exception as e:  # an exotic backend: no MFU
            self.log(f"could not look up the compiled step ({e!r}); no MFU")
            compiled = None
        if compiled is not None:
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
        out[throughput_key(self.unit[0])] = out["images_per_second"] * self.unit[1]
        self.record("train", step, out)

    def epoch_end(self, record: dict, eval_keys: Sequence[str] = ()) -> None:
        """The loop's epoch record; `eval_keys`, the evaluation's metrics in it, go to an "eval"
        record (TensorBoard `eval/<name>`), the rest to an "epoch" record."""
        report = self.goodput.report()
        if self.writer is None:
            return
        step = record["step"]
        evals = {k: record[k] for k in eval_keys if k in record}
        epoch = {k: v for k, v in record.items() if k not in evals and k != "step"}
        epoch["compile_seconds"] = self.compile_seconds
        if self.flops and self.step_images and record.get("images_per_second"):
            steps_per_second = record["images_per_second"] / self.step_images
            epoch["mfu"] = mfu(self.flops, steps_per_second, self.peak_tflops)
        self.record("epoch", step, epoch)
        if evals:
            self.record("eval", step, evals)
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
