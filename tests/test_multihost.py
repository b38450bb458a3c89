"""Several real processes on loopback (gloo): same results as one process, clean failures, a
coordinator that listens only on its own address, and the launcher's bad input in one line."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from jaxdist import UsageError
from jaxdist.cluster.distributed import ClusterSpec, validate
from jaxdist.errors import EXIT_UNAVAILABLE, EXIT_USAGE, TransientError
from jaxdist.launch import free_port
from runs import STEP_EVENTS, Run

WORKER = str(REPO / "tests" / "multihost_worker.py")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _launch(args, command, timeout=240):
    return subprocess.run([sys.executable, "-m", "jaxdist.launch", *args, "--", *command],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("strategy", ["jit", "shard_map"])
def test_2_processes_x_4_devices_equal_1_process_x_8_devices(strategy, mnist, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    single = subprocess.run([sys.executable, WORKER, str(one), strategy, "5"], cwd=REPO,
                            env=_env(JAXDIST_CPU_DEVICES="8"), capture_output=True, text=True,
                            timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = _launch(["-n", "2", "--devices_per_process", "4"],
                    [sys.executable, WORKER, str(two), strategy, "5"])
    assert multi.returncode == 0, multi.stdout[-3000:]
    assert "[p1] process 1/2 devices 8 done" in multi.stdout
    a, b = np.load(one), np.load(two)
    assert len(a.files) == len(b.files) == 8
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_when_one_process_is_killed_the_others_exit_nonzero_naming_it(mnist):
    port = free_port()
    runs = [Run(["--epochs", "1", *STEP_EVENTS],
                env=dict(JAXDIST_COORDINATOR=f"127.0.0.1:{port}", JAXDIST_NUM_PROCESSES="2",
                         JAXDIST_PROCESS_ID=str(pid), JAXDIST_CPU_DEVICES="2",
                         JAXDIST_HEARTBEAT_TIMEOUT="20"))
            for pid in range(2)]
    try:
        runs[0].wait_for_step(20)  # 469 steps in the epoch: the kill lands mid-run
        runs[1].send(signal.SIGKILL)
        killed_at = time.monotonic()
        code, out = runs[0].finish(timeout=300)
        seconds = time.monotonic() - killed_at
    finally:
        for run in runs:
            run.kill()
    assert code != 0
    assert "done:" not in out
    assert "stopped sending heartbeats" in out
    # the heartbeat timeout (20 s) is what ends the survivor, not the end of its epoch
    assert seconds <= 120, f"survivor took {seconds:.0f} s to exit"


def test_an_unreachable_coordinator_exits_restartable_within_the_init_timeout_in_one_line():
    """Process 0 may only be slow to start: not bad input (final), but 69, which is restarted."""
    port = free_port()  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--coordinator",
         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1", "--init_timeout", "5"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr[-2000:]
    assert f"coordinator 127.0.0.1:{port} unreachable after 5 s" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - start < 90  # the 5 s asked for, not the default 120 s


def test_a_coordinator_that_cannot_listen_exits_restartable_in_one_line():
    with socket.socket() as taken:  # a previous start still holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--coordinator",
             f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "0", "--init_timeout",
             "3"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr[-2000:]
    assert f"the coordinator cannot listen on 127.0.0.1:{port} after 3 s" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_launcher_prefixes_output_and_stops_everyone_when_one_process_fails():
    # the others would sleep far past the timeout: the run ends only because they were stopped
    script = ("import os, sys, time; pid = int(os.environ['JAXDIST_PROCESS_ID']); "
              "print('hello from', pid, os.environ['JAXDIST_COORDINATOR'], flush=True); "
              "sys.exit(3) if pid == 1 else time.sleep(3600)")
    proc = _launch(["-n", "3"], [sys.executable, "-c", script], timeout=300)
    assert proc.returncode == 3
    assert "[p1] hello from 1 127.0.0.1:" in proc.stdout
    assert "process 1 (slot 1) exited with status 3" in proc.stderr


@pytest.mark.parametrize(
    "spec, message",
    [
        (ClusterSpec("127.0.0.1:1234", 2, 2), "process id 2 is out of range for 2 processes"),
        (ClusterSpec("127.0.0.1:1234", 2, None), "needs the coordinator address, the process count"),
        (ClusterSpec("localhost", 2, 0), "must be HOST:PORT"),
        (ClusterSpec("127.0.0.1:1234", 0, 0), "at least 1"),
    ],
)
def test_bad_cluster_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        validate(spec)


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch):
    from jaxdist.cluster.distributed import spec_from_env

    monkeypatch.setenv("JAXDIST_INIT_TIMEOUT", "7")
    monkeypatch.delenv("JAXDIST_HEARTBEAT_TIMEOUT", raising=False)
    assert spec_from_env().init_timeout == 7
    assert spec_from_env().heartbeat_timeout == 30
    assert spec_from_env(ClusterSpec(init_timeout=3)).init_timeout == 3


def test_kubernetes_indexed_job_env_gives_the_process_id(monkeypatch):
    from jaxdist.cluster.distributed import spec_from_env

    monkeypatch.setenv("JAXDIST_COORDINATOR", "jaxdist-mnist-0.jaxdist-mnist:8476")
    monkeypatch.setenv("JAXDIST_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAXDIST_PROCESS_ID", raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    spec = spec_from_env()
    assert (spec.coordinator, spec.num_processes, spec.process_id) == (
        "jaxdist-mnist-0.jaxdist-mnist:8476", 2, 1)
    validate(spec)


def test_slurm_and_mpi_multi_process_jobs_are_detected(monkeypatch):
    from jaxdist.cluster.distributed import detected_scheduler

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert detected_scheduler() is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detected_scheduler() is None  # a one-task allocation is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detected_scheduler() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert detected_scheduler() == "mpi"


def test_a_process_that_expects_another_process_count_exits_2_saying_so():
    port = free_port()
    script = ("import sys; from jaxdist.cluster import initialize; from jaxdist import UsageError\n"
              "try:\n    initialize()\nexcept UsageError as e:\n    print(e, file=sys.stderr); "
              "sys.exit(2)\nimport time; time.sleep(2)")
    procs = [subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=_env(JAXDIST_COORDINATOR=f"127.0.0.1:{port}", JAXDIST_PROCESS_ID=str(pid),
                            JAXDIST_NUM_PROCESSES=str(count), JAXDIST_INIT_TIMEOUT="20",
                            JAXDIST_HEARTBEAT_TIMEOUT="10"))
        for pid, count in ((0, 2), (1, 3))]
    try:
        _, err = procs[1].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.communicate()  # reaps it and closes its pipes
    assert procs[1].returncode == 2
    assert "expected 3 processes but the job has 2" in err


_COLLECTIVES = ("from jaxdist.cluster import configure_cpu_devices, initialize\n"
                "configure_cpu_devices(); assert initialize()\n"
                "import jax, jax.numpy as jnp\n"
                "x = jnp.arange(8.0 * jax.device_count())\n"
                "mesh = jax.make_mesh((jax.device_count(),), ('d',))\n"
                "total = jax.jit(jnp.sum)(jax.device_put(x, jax.sharding.NamedSharding("
                "mesh, jax.sharding.PartitionSpec('d'))))\n"
                "print('collectives', jax.config.jax_cpu_collectives_implementation, float(total))")


@pytest.mark.parametrize("processes, expected", [(1, "None"), (2, "gloo")])
def test_a_one_process_job_keeps_collectives_in_process_and_several_use_gloo(processes, expected):
    """gloo would carry even a single process's collectives over loopback TCP (20% slower)."""
    done = _launch(["-n", str(processes), "--devices_per_process", "2"],
                   [sys.executable, "-c", _COLLECTIVES])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    n = 2 * processes * 8
    assert f"collectives {expected} {n * (n - 1) / 2}" in done.stdout


@pytest.fixture
def no_cluster_env(monkeypatch):
    for var in ("JAXDIST_COORDINATOR", "JAXDIST_NUM_PROCESSES", "JAXDIST_PROCESS_ID",
                "JAXDIST_COORDINATOR_BIND", "JAX_COORDINATOR_BIND_ADDRESS", "JOB_COMPLETION_INDEX",
                "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_PORT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_process_0_listens_on_the_coordinator_address_unless_told_otherwise(no_cluster_env):
    from jaxdist.cluster.distributed import join_arguments

    spec = ClusterSpec("10.1.2.3:8476", 2, 0)
    assert join_arguments(spec)["coordinator_bind_address"] == "10.1.2.3:8476"
    assert "coordinator_bind_address" not in join_arguments(ClusterSpec("10.1.2.3:8476", 2, 1))
    assert join_arguments(ClusterSpec("[fd00::1]:8476", 2, 0))["coordinator_bind_address"] == (
        "[fd00::1]:8476")
    no_cluster_env.setenv("JAX_COORDINATOR_BIND_ADDRESS", "10.1.2.4:8476")  # JAX's own override
    assert join_arguments(spec)["coordinator_bind_address"] == "10.1.2.4:8476"
    no_cluster_env.setenv("JAXDIST_COORDINATOR_BIND", "[::]:8476")  # ours wins
    assert join_arguments(spec)["coordinator_bind_address"] == "[::]:8476"
    explicit = ClusterSpec("10.1.2.3:8476", 2, 0, bind_address="10.9.9.9:8476")  # --bind
    assert join_arguments(explicit)["coordinator_bind_address"] == "10.9.9.9:8476"


def test_under_slurm_process_0_listens_on_the_detected_coordinator(no_cluster_env):
    from jaxdist.cluster import distributed
    from jaxdist.cluster.distributed import join_arguments

    def unknown(host, port, **kw):  # no DNS lookup from a test: the node names are made up
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    no_cluster_env.setattr(distributed.socket, "getaddrinfo", unknown)
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID="0",
                            SLURM_LOCALID="0", SLURM_STEP_NODELIST="node[007-008]").items():
        no_cluster_env.setenv(name, value)
    kwargs = join_arguments(ClusterSpec())
    port = 4242 % 4096 + 65536 - 4096  # JAX's SLURM port: from the job id
    assert kwargs["coordinator_address"] == f"node007:{port}"
    assert (kwargs["num_processes"], kwargs["process_id"]) == (2, 0)
    assert kwargs["coordinator_bind_address"] == f"node007:{port}"  # not [::], every interface
    assert kwargs["cluster_detection_method"] == "deactivate"  # detected once, here
    no_cluster_env.setenv("SLURM_PROCID", "1")
    assert "coordinator_bind_address" not in join_arguments(ClusterSpec())


def test_a_name_that_resolves_here_to_loopback_only_listens_everywhere_with_a_warning(
        monkeypatch, capsys):
    """Debian's `127.0.1.1 host` line: other hosts could not reach a loopback-only service."""
    from jaxdist.cluster import distributed

    monkeypatch.setattr(distributed.socket, "getaddrinfo", lambda host, port, **kw: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", port))])
    assert distributed.default_bind("node001:8476") == "[::]:8476"
    assert "resolves here to loopback only" in capsys.readouterr().err
    assert distributed.default_bind("localhost:8476") == "localhost:8476"  # meant as loopback
    assert distributed.default_bind("127.0.0.1:8476") == "127.0.0.1:8476"


def test_runtime_errors_while_joining_are_transient_and_refused_arguments_bad_input(monkeypatch):
    import jax

    from jaxdist.cluster.distributed import _join

    kwargs = dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)

    def unavailable(**kw):
        raise jax.errors.JaxRuntimeError("UNAVAILABLE: failed to connect")

    monkeypatch.setattr(jax.distributed, "initialize", unavailable)
    with pytest.raises(TransientError, match="UNAVAILABLE: failed to connect"):
        _join(kwargs)

    def refused(**kw):
        raise ValueError("process_id and num_processes must be nonnegative")

    monkeypatch.setattr(jax.distributed, "initialize", refused)
    with pytest.raises(UsageError, match="must be nonnegative"):
        _join(kwargs)


def test_process_0_waits_for_its_address_to_be_free_then_gives_up_restartable():
    from jaxdist.cluster.distributed import wait_until_listenable

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransientError, match=f"cannot listen on 127.0.0.1:{port} after 1 s"):
            wait_until_listenable(f"127.0.0.1:{port}", 1)
    wait_until_listenable(f"127.0.0.1:{port}", 1)  # released: at once


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp6"), reason="reads Linux's /proc/net")
def test_a_real_coordinator_listens_on_its_own_address_only():
    port = free_port()
    script = ("from jaxdist.cluster import initialize; assert initialize(); "
              "print('joined', flush=True); import sys; sys.stdin.read()")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=_env(JAXDIST_COORDINATOR=f"127.0.0.1:{port}", JAXDIST_NUM_PROCESSES="1",
                 JAXDIST_PROCESS_ID="0"))
    try:
        for line in proc.stdout:  # until it has joined (its service is up)
            if line.startswith("joined"):
                break
        addresses = _listening_addresses(port)
    finally:
        proc.kill()
        proc.communicate()
    assert addresses, "nothing listens on the coordinator's port"
    wildcard = {"00000000", "0" * 32}  # 0.0.0.0 and ::
    assert not addresses & wildcard, addresses


@pytest.mark.parametrize("args, message", [
    (["--", "jaxdist-no-such-command"],
     "cannot run 'jaxdist-no-such-command': No such file or directory"),
    (["--run_dir", "/proc/jaxdist-run", "--", "true"],
     "--run_dir /proc/jaxdist-run cannot be used"),
    (["--run_dir", "{afile}/run", "--", "true"],
     "--run_dir {afile}/run is not a directory ({afile} is a file)"),
])
def test_the_launchers_bad_input_exits_2_with_one_line(capsys, tmp_path, args, message):
    from jaxdist.launch import main

    afile = tmp_path / "notes.txt"
    afile.write_text("not a directory")
    code = main([arg.format(afile=afile) for arg in args])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE
    assert message.format(afile=afile) in err
    assert len(err.splitlines()) == 1 and not out
