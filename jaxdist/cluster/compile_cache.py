"""A persistent XLA compilation cache, so a restarted job skips recompiling its step.

Restarts are the common case of fault tolerance (preemption, resume), and on CPU compiling the
train step is a large part of a short job's first seconds. JAX's own persistent cache does the
work; this picks a directory, lowers the thresholds that would skip small programs, and makes the
cache safe for multi-process CPU jobs.

**Multi-process CPU jobs** (gloo collectives) hung on a warm cache (docs/cpu-collectives.md,
"The compilation cache"). Measured with a bare two-process `psum`: the job finishes when every
process compiles its program, and when every process loads *its own* serialized program; it hangs
when some processes load a program while the others compile it, either way round. JAX's rules give
exactly that on a second start: only process 0 writes entries, so process 0 loads and the others
compile. So, where the job has several processes and the backend is the CPU:
- each process keys entries by its process id and count and writes its own (JAX's rule "process 0
  writes" is lifted for these keys only), so no process runs a program another one compiled;
- before a program that spans processes is loaded, the processes agree through the coordinator's
  key-value store: it is loaded only when every process holds it, otherwise every process compiles.
  They meet under the program's name and compile options (the cache keys differ between processes:
  they hash the CPU topology, which names each process's own devices); the first verdict written
  is everyone's, so a process that waited in vain (a peer that never compiles the program) can
  only make them all compile. A program one process compiles alone on purpose (an analysis, never
  run) goes under `compiled_by_this_process_only()` and waits for nobody.
This reaches into two private functions of `jax._src.compiler`. Where they are not as expected
(another jax version), the cache is turned off for multi-process CPU jobs instead. Accelerator
backends keep JAX's own behaviour (on GPU JAX strips the device assignment from the key so that
one entry serves every process).

jaxlib 0.12 cannot serialize a CPU executable that calls oneDNN (`jaxdist.cluster.devices`
turns oneDNN convolutions on by default): writing such an entry fails with `std::bad_alloc`, the
program is compiled again on the next start (by every process alike), and everything else is
still cached. Set JAXDIST_CPU_ONEDNN=0 where restart latency matters more than step time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import logging
import os
import threading
import warnings
from pathlib import Path

import jax

from jaxdist.cluster import kv
from jaxdist.errors import UsageError, first_line

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxdist" / "xla"
AGREE_TIMEOUT_MS = 120 * 1000  # then compile: waiting longer only saves a compile
_KV_PREFIX = "jaxdist/compile_cache"
log = logging.getLogger(__name__)


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Caches every compiled program under `directory` (default: $JAXDIST_COMPILE_CACHE, then
    ~/.cache/jaxdist/xla). Safe to call more than once; call it after joining a job (as
    `run_main` does), since only then can it turn the cache off where it cannot be made safe.
    Returns the directory in use; one that cannot be created or written is a `UsageError`."""
    path = Path(directory or os.environ.get("JAXDIST_COMPILE_CACHE") or DEFAULT_DIR).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"compilation cache directory {path} is not writable ({e.strerror or e}); "
                         "choose another with --compile_cache DIR, or --compile_cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # the known failure above, once per program and harmless: not worth a warning each time
    warnings.filterwarnings(
        "ignore", message=r"Error writing persistent compilation cache entry .*bad_alloc")
    if not _install_process_safe_cache() and _job()[1] > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_compilation_cache_dir", None)  # pragma: no cover - another jax
        log.warning("compilation cache off: this jax's cache cannot be made safe for several "
                    "CPU processes")
    return path


# -- the process-safe cache for multi-process CPU jobs ---------------------------------------------

_installed = False
_local = threading.local()  # .alone: compiles of this thread are one process's own (see below)


@contextlib.contextmanager
def compiled_by_this_process_only():
    """Compiles inside bypass the cache in a multi-process CPU job: for analyses that one process
    makes alone (the monitor's FLOP count of the step on process 0). The other processes never
    compile them, so agreeing on them would only wait `AGREE_TIMEOUT_MS` in vain."""
    before = getattr(_local, "alone", False)
    _local.alone = True
    try:
        yield
    finally:
        _local.alone = before
_meetings: collections.Counter = collections.Counter()  # (name, options digest): compiles so far
_lock = threading.Lock()


def _job() -> tuple[int, int, object]:
    """(process id, process count, coordinator client) of the joined job; (0, 1, None) if none."""
    from jax._src import distributed  # its process id and count, set while joining

    state = distributed.global_state
    return state.process_id or 0, state.num_processes or 1, kv.client()


def _per_process(backend) -> bool:
    return getattr(backend, "platform", None) == "cpu" and _job()[1] > 1


def _alone() -> bool:
    return getattr(_local, "alone", False)


def _own_key(cache_key: str) -> str:
    process_id, processes, _ = _job()
    return f"{cache_key}-p{process_id}of{processes}"


def _spans_processes(devices) -> bool:
    try:
        return len({d.process_index for d in devices}) > 1
    except TypeError:  # pragma: no cover - not a device list
        return True


def meeting_place(module_name: str, compile_options) -> str:
    """Where the processes compiling one program meet: its name, a digest of its compile options
    and how many times this process compiled that pair before. Cache keys cannot serve: they hash
    the CPU topology, which differs between processes (it names the process's own devices)."""
    from jax._src import cache_key  # its hash of the options leaves out per-process debug fields

    hashed = hashlib.sha256()
    cache_key._hash_serialized_compile_options(hashed, compile_options)
    digest = hashed.hexdigest()[:16]
    with _lock:
        _meetings[module_name, digest] += 1
        nth = _meetings[module_name, digest]
    return f"{_KV_PREFIX}/{module_name}/{digest}/{nth}"


def agree_all_hold(place: str, holds: bool) -> bool:
    """True when every process of the job holds its own cached copy of the program meeting at
    `place`; then every process loads it, otherwise every process compiles it.

    Each process publishes whether it holds the program and reads the others' answers; the first
    verdict written is everyone's, so a process that gave up waiting (a peer that never compiles
    this program, or one far behind) can only make everybody compile.
    """
    process_id, processes, client = _job()
    client.key_value_set(f"{place}/{process_id}", "1" if holds else "0")
    try:
        answers = [client.blocking_key_value_get(f"{place}/{p}", AGREE_TIMEOUT_MS)
                   for p in range(processes) if p != process_id]
        verdict = "load" if holds and all(a == "1" for a in answers) else "compile"
    except Exception as e:  # the runtime raises on a deadline; no peer answered
        log.warning("compilation cache: no answer from every process at %s (%s); compiling",
                    place, first_line(e))
        verdict = "compile"
    try:
        client.key_value_set(f"{place}/verdict", verdict)  # fails if a verdict is already set
    except Exception:
        verdict = client.blocking_key_value_get(f"{place}/verdict", AGREE_TIMEOUT_MS)
    return verdict == "load"


def _install_process_safe_cache() -> bool:
    """Wraps JAX's cache read and write (see the module docstring); False where they differ from
    the signatures this was written against."""
    global _installed
    if _installed:
        return True
    try:
        from jax._src import cache_key, compilation_cache, compiler

        read, write = compiler._cache_read, compiler._cache_write
        expected_read = ["module_name", "cache_key", "compile_options", "backend",
                         "executable_devices", "host_callbacks"]
        expected_write = ["cache_key", "compile_time_secs", "module_name", "backend", "executable"]
        if (not hasattr(cache_key, "_hash_serialized_compile_options")
                or list(inspect.signature(read).parameters) != expected_read
                or list(inspect.signature(write).parameters) != expected_write
                or not hasattr(compilation_cache, "put_executable_and_time")):
            return False
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover
        return False

    def cache_read(module_name, cache_key, compile_options, backend, executable_devices,
                   host_callbacks):
        if not _per_process(backend):
            return read(module_name, cache_key, compile_options, backend, executable_devices,
                        host_callbacks)
        if _alone():
            return None, None
        executable, compile_time = read(module_name, _own_key(cache_key), compile_options,
                                        backend, executable_devices, host_callbacks)
        if _spans_processes(executable_devices) and not agree_all_hold(
                meeting_place(module_name, compile_options), executable is not None):
            log.debug("compilation cache: %s is not held by every process; compiling", module_name)
            return None, None
        return executable, compile_time

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable):
        if not _per_process(backend):
            return write(cache_key, compile_time_secs, module_name, backend, executable)
        if _alone() or compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
            return None
        try:  # every process writes its own entry (JAX's `_cache_write` skips all but process 0)
            compilation_cache.put_executable_and_time(
                _own_key(cache_key), module_name, executable, backend, int(compile_time_secs))
        except Exception as e:  # as JAX does: a failed write costs a compile next time, no more
            warnings.warn(f"Error writing persistent compilation cache entry for "
                          f"'{module_name}': {type(e).__name__}: {e}")
        return None

    compiler._cache_read, compiler._cache_write = cache_read, cache_write
    _installed = True
    return True

