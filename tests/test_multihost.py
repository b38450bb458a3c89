"""Several real processes on loopback (gloo): same results as one process, clean failures."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from jaxdist import UsageError
from jaxdist.cluster.distributed import ClusterSpec, validate
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


def test_a_wrong_coordinator_address_fails_within_the_init_timeout_with_a_clear_message():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--coordinator",
         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1", "--init_timeout", "5"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"coordinator 127.0.0.1:{port} unreachable after 5 s" in proc.stderr
    assert time.monotonic() - start < 90  # the 5 s asked for, not the default 120 s


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
            p.wait()
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
