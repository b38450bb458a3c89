"""Joining a multi-process job: `jax.distributed.initialize` from flags, environment or scheduler.

Where the numbers come from, first match wins:
1. explicit values (flags), then `JAXDIST_COORDINATOR` / `JAXDIST_NUM_PROCESSES` /
   `JAXDIST_PROCESS_ID` (timeouts: `JAXDIST_INIT_TIMEOUT`, `JAXDIST_HEARTBEAT_TIMEOUT`; set by
   `python -m jaxdist.launch` and the cluster templates). On
   Kubernetes Indexed Jobs the process id may come from `JOB_COMPLETION_INDEX`.
2. JAX's own cluster detection: SLURM (`srun`), Open MPI (`mpirun`), Kubernetes (with the
   `kubernetes` package). jaxdist never re-implements it.
3. nothing: a single-process job, and `initialize` does nothing.

The coordination service JAX starts in process 0 has **no authentication**: anyone who reaches
its port can join or disrupt the job, so the job's network must be private. It listens only on
the interface of the coordinator's own address (the launcher's is 127.0.0.1), not on every
interface as `jax.distributed` would by default; `--bind` / `JAXDIST_COORDINATOR_BIND` (or JAX's
`JAX_COORDINATOR_BIND_ADDRESS`) choose another, e.g. `[::]:8476` for all.

For up to the init timeout (`JAXDIST_INIT_TIMEOUT`, 120 s) the other processes wait for process
0's coordinator to be reachable, and process 0 for its address to be one it can listen on; then
they give up with a `TransientError` (exit 69, restarted), as when the runtime's join raises. The
join itself has the init timeout again; one that times out aborts the process inside the runtime
(a signal: restarted too). A malformed address or inconsistent ids are a `UsageError` (exit 2,
final).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys
import time

import jax

from jaxdist.errors import TransientError, UsageError, first_line

ENV_COORDINATOR = "JAXDIST_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIST_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIST_PROCESS_ID"
ENV_BIND = "JAXDIST_COORDINATOR_BIND"
ENV_INIT_TIMEOUT = "JAXDIST_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAXDIST_HEARTBEAT_TIMEOUT"
ENV_JOINED_FILE = "JAXDIST_JOINED_FILE"  # touched once joined: the launcher's "it could start"
ENV_JAX_BIND = "JAX_COORDINATOR_BIND_ADDRESS"  # JAX's own override, honoured as well
RETRY_SECONDS = 1.0  # pause between checks that the coordinator is up / can listen
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
    bind_address: str | None = None  # None: $JAXDIST_COORDINATOR_BIND, else `default_bind`


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
        bind_address=(base.bind_address or os.environ.get(ENV_BIND)
                      or os.environ.get(ENV_JAX_BIND) or None),
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
    """Non-zero processes: wait until something listens at `address`, up to `timeout` seconds;
    then a `TransientError`: process 0 may only be slow to start, and a restart tries again."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:
            last_error = e
        if time.monotonic() + RETRY_SECONDS / 2 >= deadline:
            break
        time.sleep(RETRY_SECONDS / 2)
    raise TransientError(
        f"coordinator {address} unreachable after {timeout:.0f} s ({last_error}); check the "
        "address, that process 0 is running, and that the port is open on the private network"
    )


def default_bind(coordinator: str) -> str:
    """Where process 0's coordination service listens when nothing else is asked for: the
    coordinator address itself, so only its own interface.

    A host name that resolves here to loopback addresses only (Debian's `127.0.1.1 host` line in
    /etc/hosts, while other hosts reach it at its network address) would shut out every other
    host; then it is every interface (`[::]:port`), with a warning. A name that does not resolve
    yet (a Kubernetes pod's DNS record comes with the pod) is kept: joining retries.
    """
    host, port = _split_address(coordinator)
    try:
        ipaddress.ip_address(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except ValueError:
        pass  # a name
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return coordinator
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)
    if loopback and host != "localhost" and not host.endswith(".localhost"):
        print(f"warning: the coordinator {coordinator} resolves here to loopback only "
              f"({', '.join(sorted(found))}); listening on every interface so other hosts can "
              f"join. Set {ENV_BIND}=ADDRESS:{port} to listen on one", file=sys.stderr, flush=True)
        return f"[::]:{port}"
    return coordinator


def _joined_processes(spec: ClusterSpec) -> int | None:
    """The job's process count once joined, read without starting JAX's backends (whose CPU
    client must be created after the collectives are chosen)."""
    try:
        from jax._src import distributed  # private, like `_backends_started`

        return distributed.global_state.num_processes
    except (ImportError, AttributeError):  # pragma: no cover - layout changed
        return spec.num_processes


def join_arguments(spec: ClusterSpec) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for `spec` (filled from the
    environment), or None for a single-process job. Under SLURM / Open MPI the coordinator,
    process count and id come from JAX's own detection, run here once so that process 0's
    service can listen on the detected coordinator's interface (see `default_bind`)."""
    spec = spec_from_env(spec)
    validate(spec)
    scheduler = detected_scheduler()
    if spec.coordinator is None and scheduler is None:
        return None
    kwargs: dict = dict(initialization_timeout=spec.init_timeout,
                        heartbeat_timeout_seconds=spec.heartbeat_timeout)
    if spec.coordinator is not None:
        coordinator, num_processes, process_id = (spec.coordinator, spec.num_processes,
                                                  spec.process_id)
    else:
        coordinator, num_processes, process_id, local_devices = _detect(scheduler, spec)
        kwargs.update(local_device_ids=local_devices, cluster_detection_method="deactivate")
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
    if process_id == 0:
        kwargs["coordinator_bind_address"] = spec.bind_address or default_bind(coordinator)
    return kwargs


def _detect(scheduler: str, spec: ClusterSpec) -> tuple:
    """(coordinator, process count, process id, local device ids) from JAX's cluster detection."""
    try:
        from jax._src import clusters  # private: what `jax.distributed.initialize` itself calls

        found = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, spec.init_timeout)
    except Exception as e:  # the detectors raise several types; all mean "cannot read it"
        raise UsageError(f"could not read the {scheduler} job's layout: {first_line(e)}") from e
    if None in found[:3]:
        raise UsageError(f"this looks like a {scheduler} job, but JAX's detection found no "
                         f"coordinator, process count or id (start it with srun / mpirun, or "
                         f"give --coordinator, --num_processes and --process_id)")
    validate(ClusterSpec(*found[:3]))
    return found


def wait_until_listenable(bind: str, timeout: float) -> None:
    """Process 0: wait until its service could listen at `bind` (the name resolves, the port is
    free), up to `timeout` seconds; then a `TransientError`. JAX's runtime kills the process
    (SIGSEGV) when it cannot listen, and a Kubernetes pod's own DNS name or a port that a previous
    start still holds may only need a moment."""
    host, port = _split_address(bind)
    deadline = time.monotonic() + timeout
    wildcard = host in ("", "::", "0.0.0.0")
    while True:
        try:
            infos = ([(socket.AF_INET, None, None, None, ("0.0.0.0", port))] if wildcard else
                     socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE))
            error: OSError | None = None
            for family, *_, address in infos:  # like gRPC: one address that binds is enough
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(address)
                        return
                    except OSError as e:
                        error = e
            raise error or OSError(f"{host} resolves to no address")
        except OSError as e:
            if time.monotonic() + RETRY_SECONDS >= deadline:
                raise TransientError(
                    f"the coordinator cannot listen on {bind} after {timeout:.0f} s ({e}); "
                    f"check that the address is this host's and the port free, or set {ENV_BIND}"
                ) from None
            time.sleep(RETRY_SECONDS)


def _join(kwargs: dict) -> None:
    """`jax.distributed.initialize(**kwargs)`; its own errors a `TransientError` (arguments it
    refuses a `UsageError`). A join that times out aborts the process inside JAX's runtime
    (SIGABRT): a signal, which the launcher and the templates restart too."""
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"could not join the distributed job: {first_line(e)}") from e
    except jax.errors.JaxRuntimeError as e:  # not reachable, timed out, could not listen
        raise TransientError(
            f"could not join the distributed job ({first_line(e)}); process "
            f"{kwargs['process_id']} of {kwargs['num_processes']}, coordinator "
            f"{kwargs['coordinator_address']}") from e


def _exit_soon_on_a_crash(heartbeat_timeout: int) -> None:
    """After an uncaught exception, print it and end the process with status 1 without the
    normal exit's wait at the runtime's shutdown barrier (5 minutes) for the processes still
    training, which wait in turn for this one in their next collective: the crash would reach the
    launcher or scheduler as a hang, 5 minutes late, instead of as a crash to restart now.

    A runtime error (a collective that failed) is most often a lost peer's symptom; the runtime
    names the lost process, and aborts this one, once its heartbeats are missed, so that case
    waits up to the heartbeat timeout first."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        try:
            previous(kind, value, traceback)
            sys.stdout.flush()
            sys.stderr.flush()
            if issubclass(kind, jax.errors.JaxRuntimeError):
                time.sleep(heartbeat_timeout + 10)
        finally:
            os._exit(1)

    sys.excepthook = hook


def initialize(spec: ClusterSpec | None = None) -> bool:
    """Joins the job described by `spec` (or the environment / scheduler). False: single process.

    On CPU, collectives across processes use gloo (a job of one process keeps XLA's in-process
    ones). Must run before anything asks JAX for devices. In a job of several processes an
    uncaught exception ends its process with status 1 (see `_exit_soon_on_a_crash`).

    Raises:
        UsageError: a malformed address, missing or inconsistent ids (final: exit 2).
        TransientError: the coordinator was not reachable or the job not joined within the init
            timeout (restarted: exit 69).
    """
    spec = spec_from_env(spec or ClusterSpec())
    kwargs = join_arguments(spec)
    if kwargs is None:
        return False
    if kwargs["process_id"] == 0:
        wait_until_listenable(kwargs["coordinator_bind_address"], spec.init_timeout)
    else:
        wait_for_coordinator(kwargs["coordinator_address"], spec.init_timeout)
    _join(kwargs)
    # chosen before JAX creates its CPU client (accelerator backends ignore it): gloo across
    # processes; with one process none, as gloo would carry even in-process collectives over
    # loopback TCP (the CNN's 8-device step ran 20% slower; docs/performance.md #18)
    several = _joined_processes(spec) != 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo" if several else None)
    if several:
        _exit_soon_on_a_crash(spec.heartbeat_timeout)
    if jax.process_count() != kwargs["num_processes"]:
        raise UsageError(
            f"this process expected {kwargs['num_processes']} processes but the job has "
            f"{jax.process_count()}"
        )
    if os.environ.get(ENV_JOINED_FILE):
        from pathlib import Path

        Path(os.environ[ENV_JOINED_FILE]).touch()
    return True
