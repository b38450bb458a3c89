"""A persistent XLA compilation cache, so a restarted job skips recompiling its step.

Restarts are the common case of fault tolerance (preemption, resume), and on CPU compiling the
train step is a large part of a short job's first seconds. JAX's own persistent cache does the
work; this only picks a directory and lowers the thresholds that would skip small programs.

jaxlib 0.12 cannot serialize a CPU executable that calls oneDNN (`jaxdist.cluster.devices`
turns oneDNN convolutions on by default): writing such an entry fails with `std::bad_alloc`, the
program is simply compiled again on the next start, and everything else is still cached. Set
JAXDIST_CPU_ONEDNN=0 where restart latency matters more than step time (docs/performance.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxdist" / "xla"


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Caches every compiled program under `directory` (default: $JAXDIST_COMPILE_CACHE, then
    ~/.cache/jaxdist/xla). Safe to call more than once; returns the directory in use."""
    path = Path(directory or os.environ.get("JAXDIST_COMPILE_CACHE") or DEFAULT_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # the known failure above, once per program and harmless: not worth a warning each time
    warnings.filterwarnings(
        "ignore", message=r"Error writing persistent compilation cache entry .*bad_alloc")
    return path
