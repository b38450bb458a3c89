"""Self-healing jobs: a frozen process ends the job with its name and every stack on disk, the
launcher restarts a failed job and it ends bitwise equal to an uninterrupted one, a process that
cannot start again leaves the job on fewer processes with the same global batches, and failures
that would recur are not restarted. Faults land at step events, never after a delay."""

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from runs import Run

WORKER = str(REPO / "tests" / "fit_worker.py")
STEPS = 120
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
       # the runtime's own heartbeat check must not end a frozen job before the watchdog does
       "JAXDIST_HEARTBEAT_TIMEOUT": "300"}


def _launch(run_dir, out, workdir, *launch_args, command=None, env=None) -> Run:
    command = command or [sys.executable, WORKER, str(out), "jit", str(STEPS), str(workdir)]
    return Run(["-m", "jaxdist.launch", "-n", "2", "--devices_per_process", "2", "--run_dir",
                str(run_dir), *launch_args, "--", *command], module=None,
               env={**ENV, **(env or {})})


def _pid(run_dir, slot) -> int:
    return json.loads((run_dir / f"slot_{slot}.json").read_text())["pid"]


def _final(out):
    with np.load(out) as f:
        return [f[k] for k in f.files]


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """The uninterrupted 2 processes x 2 devices run, through the launcher."""
    where = tmp_path_factory.mktemp("two_by_two")
    code, log = _launch(where / "run", where / "final.npz", where / "work").finish()
    assert code == 0, log[-3000:]
    return _final(where / "final.npz")


def test_a_frozen_process_makes_the_other_exit_75_naming_it_with_every_stack_on_disk(tmp_path):
    hang_timeout = 10
    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work",
                  env={"FIT_HANG_TIMEOUT": str(hang_timeout)})
    frozen = None
    try:
        run.wait_for_step(30)
        frozen = _pid(tmp_path / "run", 1)
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code, log = run.finish()
        seconds = time.monotonic() - stopped_at
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.kill()
    assert code == 75, log[-3000:]
    assert "done:" not in log
    line = next(x for x in log.splitlines() if "error: hang:" in x)
    assert "process 1 is not responding" in line and "phase " in line, line
    assert "process 0 exits 75" in line
    stacks = (tmp_path / "work" / "logs" / "status" / "hang_process_0.txt").read_text()
    assert "process 1 is not responding" in stacks.splitlines()[0]
    assert "train_loop" in stacks and "most recent call first" in stacks
    assert seconds <= hang_timeout + 30, f"the survivor took {seconds:.0f} s to act"


def test_the_launcher_restarts_a_killed_job_which_ends_bitwise_equal_to_an_uninterrupted_one(
        two_by_two, tmp_path):
    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work",
                  "--max_restarts", "2")
    code, log = run.act_at_step(45, lambda: os.kill(_pid(tmp_path / "run", 1), signal.SIGKILL))
    assert code == 0, log[-3000:]
    assert "[launch] restart 1/2: process 1 (slot 1) exited with signal SIGKILL" in log
    assert "resuming at step" in log and "on 4 devices of 2 process(es)" in log
    for got, want in zip(_final(tmp_path / "final.npz"), two_by_two):
        np.testing.assert_array_equal(got, want)


def test_a_process_that_cannot_start_again_leaves_the_job_on_fewer_with_the_same_batches(
        two_by_two, tmp_path):
    dead = tmp_path / "dead_host_1"  # slot 1's host is gone: its command exits at once
    command = ["sh", "-c", f'test -e {tmp_path}/dead_host_$JAXDIST_SLOT && exit 1; exec '
               f'{sys.executable} {WORKER} {tmp_path}/final.npz jit {STEPS} {tmp_path}/work']
    run = _launch(tmp_path / "run", None, None, "--max_restarts", "3", "--min_processes", "1",
                  command=command)
    def lose_host():
        dead.touch()
        os.kill(_pid(tmp_path / "run", 1), signal.SIGKILL)

    code, log = run.act_at_step(45, lose_host)
    assert code == 0, log[-3000:]
    assert "slot(s) 1 cannot start: re-forming the job with 1 process(es)" in log
    assert "on 2 devices of 1 process(es)" in log
    # the same global batches on half the devices: only the order of the sums differs
    for got, want in zip(_final(tmp_path / "final.npz"), two_by_two):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("status, starts, message", [
    (2, 1, "not restarted (status 2 (bad input) would recur)"),
    (3, 3, "restarts used up: 2"),
])
def test_bad_input_is_not_restarted_and_restarts_are_bounded(tmp_path, status, starts, message):
    counter = tmp_path / "starts"
    command = [sys.executable, "-c", f"import jaxdist.cluster as c, sys; c.initialize(); "
               f"open({str(counter)!r}, 'a').write('x'); sys.exit({status})"]
    run = Run(["-m", "jaxdist.launch", "-n", "1", "--max_restarts", "2", "--", *command],
              module=None, env=ENV)
    code, log = run.finish()
    assert code == status, log[-2000:]
    assert message in log
    assert len(counter.read_text()) == starts


@pytest.mark.slow  # the same stop as SIGTERM to one of two processes (test_multihost), one level up
def test_sigterm_to_the_launcher_is_passed_on_and_the_job_saves_and_exits_0(tmp_path):
    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work",
                  "--max_restarts", "2")
    code, log = run.act_at_step(40, lambda: run.send(signal.SIGTERM))
    assert code == 0, log[-3000:]
    assert "passing it on" in log and "restart" not in log
    assert "stopped at step" in log


def test_the_cluster_templates_follow_the_exit_code_convention():
    """Only what would recur is final: 1 (diverged) and 2 (bad input); the rest is retried."""
    yaml = pytest.importorskip("yaml")
    from jaxdist.errors import EXIT_DIVERGED, EXIT_HANG, EXIT_USAGE, NOT_RESTARTED

    assert set(NOT_RESTARTED) == {0, EXIT_DIVERGED, EXIT_USAGE} and EXIT_HANG not in NOT_RESTARTED
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s-indexed-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")["spec"]
    rules = job["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]
    assert fail["operator"] == "In" and sorted(fail["values"]) == [EXIT_DIVERGED, EXIT_USAGE]
    assert any(r["action"] == "Ignore" for r in rules)  # disruptions are not failures
    assert job["backoffLimit"] > 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    sbatch = (REPO / "deploy" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and 'scontrol requeue "${SLURM_JOB_ID}"' in sbatch
    assert f"    {EXIT_DIVERGED}|{EXIT_USAGE})" in sbatch
