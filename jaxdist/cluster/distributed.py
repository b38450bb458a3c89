"""Joining a multi-process job: `jax.distributed.initialize` from flags, environment or scheduler.

Where the numbers come from, first match wins:
1. explicit values (flags), then `JAXDIST_COORDINATOR` / `JAXDIST_NUM_PROCESSES` /
   `JAXDIST_PROCESS_ID` (timeouts: `JAXDIST_INIT_TIMEOUT`, `JAXDIST_HEARTBEAT_TIMEOUT`; set by `python -m jaxdist.launch` and the cluster templates). On
   Kubernetes Indexed Jobs the process id may come from `JOB_COMPLETION_INDEX`.
2. JAX's own cluster detection: SLURM (`srun`), Open MPI (`mpirun`), Kubernetes (with the
   `kubernetes` package). jaxdist never re-implements it.
3. nothing: a single-process job, and `initialize` does nothing.

The coordination service JAX starts has **no authentication**: keep its port on the cluster's
private network (the launcher binds it to loopback).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax

from jaxdist.errors import UsageError

ENV_COORDINATOR = "JAXDIST_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIST_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIST_PROCESS_ID"
ENV_BIND = "JAXDIST_COORDINATOR_BIND"
ENV_INIT_TIMEOUT = "JAXDIST_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAXDIST_HEARTBEAT_TIMEOUT"
ENV_JOINED_FILE = "JAXDIST_JOINED_FILE"  # touched once joined: the launcher's "it could start"
SCHEDULER_MARKERS = {
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "mpi": ("OMPI_COMM_WORLD_SIZE",),
}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the job. All None: single process or scheduler auto-detection."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int | None = None  # None: $JAXDIST_INIT_TIMEOUT or 120 s
    heartbeat_timeout: int | None = None  # None: $JAXDIST_HEARTBEAT_TIMEOUT or 30 s
    bind_address: str | None = None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {value!r}") from None


def spec_from_env(base: ClusterSpec = ClusterSpec()) -> ClusterSpec:
    """`base` with its unset fields filled from the JAXDIST_* environment."""
    process_id = base.process_id
    if process_id is None:
        process_id = _int_env(ENV_PROCESS_ID)
    if process_id is None and os.environ.get(ENV_COORDINATOR):
        process_id = _int_env("JOB_COMPLETION_INDEX")  # Kubernetes Indexed Job
    return dataclasses.replace(
        base,
        coordinator=base.coordinator or os.environ.get(ENV_COORDINATOR) or None,
        num_processes=base.num_processes or _int_env(ENV_NUM_PROCESSES),
        process_id=process_id,
        bind_address=base.bind_address or os.environ.get(ENV_BIND) or None,
        init_timeout=base.init_timeout or _int_env(ENV_INIT_TIMEOUT) or 120,
        heartbeat_timeout=base.heartbeat_timeout or _int_env(ENV_HEARTBEAT_TIMEOUT) or 30,
    )


def detected_scheduler() -> str | None:
    """'slurm' or 'mpi' when this process was started by one for a multi-process job."""
    for name, markers in SCHEDULER_MARKERS.items():
        if all(m in os.environ for m in markers):
            size = os.environ.get(markers[-1], "1")
            if size.isdigit() and int(size) > 1:
                return name
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def validate(spec: ClusterSpec) -> None:
    """Checks that need no network: all three values present and consistent."""
    given = [spec.coordinator is not None, spec.num_processes is not None,
             spec.process_id is not None]
    if any(given) and not all(given):
        raise UsageError(
            "a multi-process job needs the coordinator address, the process count and this "
            f"process's id together (got coordinator={spec.coordinator}, "
            f"num_processes={spec.num_processes}, process_id={spec.process_id})"
        )
    if not any(given):
        return
    _split_address(spec.coordinator)
    if spec.num_processes < 1:
        raise UsageError(f"the process count must be at least 1, got {spec.num_processes}")
    if not 0 <= spec.process_id < spec.num_processes:
        raise UsageError(
            f"process id {spec.process_id} is out of range for {spec.num_processes} processes "
            f"(0..{spec.num_processes - 1})"
        )


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Non-zero processes: fail fast and clearly when nothing listens at `address`."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last_error = e
            time.sleep(0.5)
    raise UsageError(
        f"coordinator {address} unreachable after {timeout:.0f} s ({last_error}); check the "
        "address, that process 0 is running, and that the port is open on the private network"
    )


def _joined_processes(spec: ClusterSpec) -> int | None:
    """The job's process count once joined, read without starting JAX's backends (whose CPU
    client must be created after the collectives are chosen)."""
    try:
        from jax._src import distributed  # private, like `_backends_started`

        return distributed.global_state.num_processes
    except (ImportError, AttributeError):  # pragma: no cover - layout changed
        return spec.num_processes


def initialize(spec: ClusterSpec | None = None) -> bool:
    """Joins the job described by `spec` (or the environment / scheduler). False: single process.

    On CPU, collectives across processes use gloo (a job of one process keeps XLA's in-process
    ones). Must run before anything asks JAX for devices.
    """
    spec = spec_from_env(spec or ClusterSpec())
    validate(spec)
    scheduler = detected_scheduler()
    if spec.coordinator is None and scheduler is None:
        return False
    kwargs = dict(initialization_timeout=spec.init_timeout,
                  heartbeat_timeout_seconds=spec.heartbeat_timeout)
    if spec.coordinator is not None:
        if spec.process_id != 0:
            wait_for_coordinator(spec.coordinator, spec.init_timeout)
        kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                      process_id=spec.process_id, coordinator_bind_address=spec.bind_address)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the runtime raises several types; all mean "could not join"
        raise UsageError(f"could not join the distributed job: {str(e).splitlines()[0]}") from e
    # chosen before JAX creates its CPU client (accelerator backends ignore it): gloo across
    # processes; with one process none, as gloo would carry even in-process collectives over
    # loopback TCP (the CNN's 8-device step ran 20% slower; docs/performance.md #18)
    several = _joined_processes(spec) != 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo" if several else None)
    if spec.num_processes is not None and jax.process_count() != spec.num_processes:
        raise UsageError(
            f"this process expected {spec.num_processes} processes but the job has "
            f"{jax.process_count()}"
        )
    if os.environ.get(ENV_JOINED_FILE):
        from pathlib import Path

        Path(os.environ[ENV_JOINED_FILE]).touch()
    return True
