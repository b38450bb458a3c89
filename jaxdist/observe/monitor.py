"""`TrainMonitor`: metrics records, goodput, MFU, the profiler and the hang watchdog, as one
`Callback` built from `ObserveConfig`. Nothing here blocks on a step still running: the loop hands
over a step's metrics when it reads them anyway (one step late), and step times are the
intervals between those reads."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import jax

from jaxdist.cluster.compile_cache import compiled_by_this_process_only
from jaxdist.core.callback import Callback, throughput_key
from jaxdist.errors import UsageError
from jaxdist.progress import PLAIN_EVERY_SECONDS
from jaxdist.observe.flops import default_peak_tflops, flops_per_step, lowered_step, mfu
from jaxdist.observe.goodput import Goodput, format_goodput
from jaxdist.observe.watchdog import ProgressStatus, Watchdog
from jaxdist.observe.writer import MetricsWriter


@dataclasses.dataclass(frozen=True)
class ObserveConfig:
    """What a run reports and watches: progress lines, metrics, the profiler, the hang watchdog."""

    logdir: str | None = None
    """metrics.jsonl, TensorBoard event files, status files and profiles (default: <workdir>/logs
    with a work dir, else none)"""
    progress: bool = True
    """show progress: a bar on a terminal, else plain lines (see --progress_every)"""
    progress_every: float = PLAIN_EVERY_SECONDS
    """seconds between plain progress lines when output is not a terminal (0: a line every step)"""
    profile_steps: str = ""
    """A,B: capture a jax.profiler trace of steps A..B into <logdir>/profile"""
    peak_tflops: float = 0.0
    """peak TFLOP/s per device for the MFU estimate (0: a per-platform assumption)"""
    hang_timeout: float = 300.0
    """seconds without progress (3x before the first step) before the hang watchdog acts (0: off)"""
    hang_action: Literal["exit", "report"] = "exit"
    """exit: write stacks and the verdict to <logdir>/status and exit 75 so the launcher or
    scheduler restarts the job; report: only print the verdict"""

    def validate(self) -> None:
        if min(self.peak_tflops, self.hang_timeout, self.progress_every) < 0:
            raise UsageError("peak_tflops, hang_timeout and progress_every must be >= 0")
        if self.hang_action not in ("exit", "report"):
            raise UsageError(f"hang_action must be exit or report, got {self.hang_action!r}")
        try:
            parse_step_range(self.profile_steps)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def logdir_for(self, workdir: str | None) -> str | None:
        """--logdir, else <workdir>/logs with a work dir, else None (nothing written)."""
        if self.logdir:
            return self.logdir
        return str(Path(workdir) / "logs") if workdir else None

    def wanted(self, logdir: str | None) -> bool:
        """Whether a run needs a monitor: something to write, or a watchdog to run."""
        return bool(logdir) or self.hang_timeout > 0


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


class TrainMonitor(Callback):
    """What `fit` reports to: metrics records, goodput, MFU, the profiler and the hang watchdog.

    Steps are numbered like checkpoints: step N is the N-th step (the state's step after it).

    Args:
        config: what to watch and how (`ObserveConfig`: the peak for MFU, the profiled steps,
            the hang watchdog's timeout and action; its `logdir` unless `logdir` is given).
        logdir: where metrics, event files, status files and profiles go (None: nothing written;
            goodput and the watchdog still work).
        start: `time.perf_counter()` at the start of the run (goodput's wall-clock origin).
        meta: the run-metadata record (devices, strategy, global batch, model, ...).
        log: where the leader's one-line notes go (the MFU assumption, the goodput summary).
        unit: (name, count per example) the data's throughput is counted in: train and epoch
            records carry `throughput_key(name)` beside `images_per_second` (examples).
        examples_per_step: the global batch (each step's throughput).
    """

    def __init__(self, config: ObserveConfig = ObserveConfig(hang_timeout=0), *,
                 logdir: str | os.PathLike | None = None, start: float | None = None,
                 meta: dict | None = None, log: Callable[[str], None] = print,
                 writer: MetricsWriter | None = None, unit: tuple[str, int] = ("img", 1),
                 examples_per_step: int = 0):
        logdir = logdir or config.logdir
        peak_tflops, profile_steps = config.peak_tflops, parse_step_range(config.profile_steps)
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
        self.step_images = examples_per_step
        self.unit = unit
        self.trainer = None
        self.closed: dict[str, float] | None = None
        self.profile_steps = profile_steps
        if profile_steps and self.logdir is None:
            raise ValueError("profiling needs a logdir")
        self.profile_dir = None
        self._profiling = False
        self.status = ProgressStatus(self.logdir)
        self.watchdog = (Watchdog(self.status, config.hang_timeout,
                                  action=config.hang_action).start()
                         if config.hang_timeout > 0 else None)
        self._first_step = None
        self._last_read = None
        if meta is not None:
            self.record("meta", 0, {**meta, "process_count": jax.process_count()})

    # -- writing
    def record(self, kind: str, step: int, values: dict, **kw) -> None:
        if self.writer is not None:
            self.writer.write(kind, step, values, **kw)

    @contextlib.contextmanager
    def measure(self, category: str):
        """Time in `category` (data, compile, step, eval, checkpoint) counts toward goodput, and
        the watchdog's status names it as the phase the process is in."""
        self.phase("step" if category == "compile" else category)
        with self.goodput.measure(category):
            yield

    def phase(self, phase: str, step: int | None = None) -> None:
        self.status.update(phase, step)

    # -- the Callback hooks
    def on_fit_start(self, trainer: Any, state: Any, step: int) -> None:
        """Everything before the first step was start-up (or, resumed, restart) time."""
        self.trainer = trainer
        before = self.goodput.clock() - self.goodput.start - sum(self.goodput.seconds.values())
        self.goodput.add("restart" if step else "startup", max(0.0, before))
        self.status.update(step=step)
        self._start_profile_before(step + 1)

    def on_step_end(self, step: int, state: Any) -> None:
        """Ends a profile whose last step this is (waiting for it: a profile is worth one
        blocked step), or starts one whose first step is next."""
        if self._profiling and step >= self.profile_steps[1]:
            self.stop_profile(state)
        self._start_profile_before(step + 1)

    def _start_profile_before(self, step: int) -> None:
        if not self.profile_steps or step != self.profile_steps[0] or self._profiling:
            return
        self.profile_dir = self.logdir / "profile"
        if jax.process_count() > 1:
            self.profile_dir = self.profile_dir / f"process_{jax.process_index()}"
        jax.profiler.start_trace(str(self.profile_dir), create_perfetto_trace=True)
        self._profiling = True

    def stop_profile(self, wait_for: Any = None) -> None:
        if not self._profiling:
            return
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        jax.profiler.stop_trace()
        self._profiling = False
        self.log(f"profile of steps {self.profile_steps[0]}-{self.profile_steps[1]} in "
                 f"{self.profile_dir} (open with TensorBoard's profile plugin or Perfetto)")

    def on_first_step(self, step: int, seconds: float, state: Any, batch: Any) -> None:
        """The first step (number `step`) ran in `seconds`; looks up its FLOPs and collectives."""
        trainer = self.trainer
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

    def on_metrics(self, step: int, values: dict[str, float]) -> None:
        """Step `step`'s metrics were read on the host (one step late)."""
        images = self.step_images
        now = time.perf_counter()
        if step == self._first_step or self._last_read is None:
            seconds = self.compile_seconds
        else:
            seconds, self._last_read = now - self._last_read, now
        self.status.update(step=step)
        if self.writer is None:
            return
        out = dict(values)
        out["step_seconds"] = seconds
        out["images_per_second"] = images / seconds if seconds > 0 else 0.0
        out[throughput_key(self.unit[0])] = out["images_per_second"] * self.unit[1]
        self.record("train", step, out)

    def on_epoch_end(self, record: dict, state: Any) -> None:
        """The epoch record; the evaluation's metrics in it (`record["eval_keys"]`) go to an
        "eval" record (TensorBoard `eval/<name>`), the rest to an "epoch" record."""
        report = self.goodput.report()
        if self.writer is None:
            return
        step = record["step"]
        evals = {k: record[k] for k in record.get("eval_keys", ()) if k in record}
        epoch = {k: v for k, v in record.items()
                 if k not in evals and k not in ("step", "eval_keys", "stopped")}
        epoch["compile_seconds"] = self.compile_seconds
        if self.flops and self.step_images and record.get("images_per_second"):
            steps_per_second = record["images_per_second"] / self.step_images
            epoch["mfu"] = mfu(self.flops, steps_per_second, self.peak_tflops)
        self.record("epoch", step, epoch)
        if evals:
            self.record("eval", step, evals)
        self.record("goodput", step, report)
        self.writer.flush()

    def on_fit_end(self, run: Any) -> None:
        """The run's goodput is the monitor's (it closes here, after the final save)."""
        run.goodput = self.close(run.last_step)

    def __enter__(self) -> "TrainMonitor":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self, step: int | None = None) -> dict[str, float]:
        """Stops the profiler and watchdog, writes the final goodput; returns it (once: a second
        call returns the first one's report)."""
        if self.closed is not None:
            return self.closed
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
        self.closed = report
        return report
