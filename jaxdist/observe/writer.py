"""Run records: `<logdir>/metrics.jsonl` (one JSON object per record: `kind`, `step`, `time`
(Unix seconds), then the values) and TensorBoard event files (tensorboardX scalars, tag
`kind/name`). Only process 0 writes; on the others every method does nothing."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax


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
