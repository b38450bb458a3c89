"""deploy/slurm.sbatch on a real SLURM (slurm-wlm + munge on this machine): a task killed mid-run
makes the job requeue itself, and the requeued job resumes from its checkpoint and finishes.

Slow (`-m slow`). Starts a single-node cluster with scripts/slurm_local.sh (as root; it installs
Debian's packages when they are missing) and skips, with the reason, where it cannot.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO, SHARED_TFDS

pytestmark = pytest.mark.slow
FAIL_SAFE_SECONDS = 900


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh")], capture_output=True,
                          text=True, timeout=FAIL_SAFE_SECONDS)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    assert shutil.which("sbatch")


def _job(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(what: str, predicate, poll: float = 1.0):
    """Polls `predicate` until truthy (a file written, a state reached); the limit is a
    fail-safe against a stuck job, not a measurement."""
    deadline = time.monotonic() + FAIL_SAFE_SECONDS
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"no {what} within {FAIL_SAFE_SECONDS} s")


def _task_pid(job_id: str, task: int) -> int | None:
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        pid, _, step, _, global_id = (line.split() + ["-"] * 5)[:5]
        if step == "0" and global_id == str(task):
            return int(pid)
    return None


def test_a_task_killed_mid_run_requeues_the_job_which_resumes_and_finishes(slurm, tmp_path):
    out = tmp_path / "job.out"
    env = {**os.environ, "JAXDIST_CPU_DEVICES": "2", "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR", str(SHARED_TFDS)),
           "JAXDIST_WORKDIR": str(tmp_path / "work"), "JAXDIST_MAX_RESTARTS": "2"}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
         "--gpus-per-node=0", f"--output={out}", "--job-name=jaxdist-test",
         str(REPO / "deploy" / "slurm.sbatch"), "--epochs", "1", "--progress_every", "0",
         "--checkpoint_every", "50", "--compile_cache", "off"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        _wait("step 60", lambda: out.exists() and re.search(r"\| step ([6-9]\d|\d{3,})/",
                                                            out.read_text()))
        # the kill lands after step 50's save is committed (saves are asynchronous)
        _wait("step 50's checkpoint", lambda: (tmp_path / "work" / "checkpoints" / "50").is_dir())
        os.kill(_wait("task 1's pid", lambda: _task_pid(job_id, 1)), signal.SIGKILL)
        # SLURM holds the requeued job until the killed run's credential expires (10 s under
        # scripts/slurm_local.sh), then starts it again on its own
        _wait("the requeue", lambda: _job(job_id).get("Restarts") == "1")
        job = _wait("the job's end", lambda: (lambda j: j if j.get("JobState") in (
            "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None)(_job(job_id)))
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log = out.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-3000:]
    assert "requeueing, restart 1/2" in log
    resumed = int(re.search(r"resuming at step (\d+)", log).group(1))
    assert resumed >= 50 and resumed % 50 == 0
    accuracy = float(re.search(r"done: test accuracy ([\d.]+)%", log).group(1))
    assert accuracy > 97.0, log[-2000:]
    assert "jaxdist: finished (status 0)" in log
