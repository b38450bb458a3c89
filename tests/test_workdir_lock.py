"""A work dir is held by one job at a time: a second job on it ends at once with one line naming
the holder (exit 2), and a holder that died does not block the next start."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import optax
import pytest
from flax import nnx

import jaxdist
from conftest import REPO
from jaxdist.errors import EXIT_USAGE, UsageError
from jaxdist.io import workdir as workdir_lock
from runs import Run
from task import QUIET, MLP, arrays, loss_fn

# holds the work dir named by argv[1] until a signal ends it
HOLDER = ("import signal, sys\nfrom jaxdist.io.workdir import hold\nwith hold(sys.argv[1]):\n"
          "    print('holding', flush=True)\n    signal.pause()\n")


def _holder(workdir) -> Run:
    run = Run(["-c", HOLDER, str(workdir)], module=None)
    run.wait_for_text("holding")
    return run


def _fit(workdir, steps=2):
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=2)
    return jaxdist.fit(trainer, jaxdist.data.from_arrays(arrays(256), global_batch=64),
                       steps=steps, observe=QUIET, log=lambda _: None,
                       checkpoint=jaxdist.CheckpointConfig(workdir=str(workdir), every=1))


def _in_use(pid: int) -> str:
    return f"is in use by another job (host {socket.gethostname()}, pid {pid}, since "


def test_a_second_job_on_a_held_work_dir_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UsageError, match=_in_use(holder.proc.pid).replace("(", r"\(")):
            _fit(tmp_path)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
    finally:
        holder.kill()


def test_a_second_experiment_on_a_held_work_dir_exits_2_with_one_line(mnist, tmp_path):
    holder = _holder(tmp_path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "experiments.mnist", "--config", "smoke", "--workdir",
             str(tmp_path)], capture_output=True, text=True, timeout=600,
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        holder.kill()
    assert done.returncode == EXIT_USAGE, done.stdout[-2000:] + done.stderr[-2000:]
    assert _in_use(holder.proc.pid) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_holder_killed_with_kill_9_does_not_block_the_next_start(tmp_path):
    holder = _holder(tmp_path)
    holder.send(signal.SIGKILL)
    code, _ = holder.finish()
    assert code == -signal.SIGKILL
    record = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert record["pid"] == holder.proc.pid  # its record is still there; its flock is not
    run = _fit(tmp_path)
    assert not run.stopped and run.start_step == 0
    assert (tmp_path / workdir_lock.LOCK_NAME).read_text() == ""  # released at the end
    assert _fit(tmp_path, steps=4).start_step == 2  # and taken again by the next run


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without locks: flock fails with ENOLCK; only the holder record counts."""
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def _record(workdir, pid, heartbeat_age=0.0):
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": "earlier"}))
    then = time.time() - heartbeat_age
    os.utime(path, (then, then))


def test_without_flock_a_live_holder_record_still_refuses(tmp_path, no_flock):
    _record(tmp_path, os.getpid())  # this very process: alive
    with pytest.raises(UsageError, match="is in use by another job"):
        with workdir_lock.hold(tmp_path):
            pass


@pytest.mark.parametrize("why", ["its pid is gone", "its heartbeat is old"])
def test_without_flock_a_dead_holder_record_does_not_block(tmp_path, no_flock, why):
    if why == "its pid is gone":
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        _record(tmp_path, int(gone.stdout))
    else:
        _record(tmp_path, os.getpid(), heartbeat_age=2 * workdir_lock.LEASE_S)
    with workdir_lock.hold(tmp_path):
        record = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["since"] != "earlier"
