"""Self-healing jobs: a frozen process ends the job with its name and every stack on disk, the
launcher restarts a failed job (a kill, a plain exception) and it ends bitwise equal to an
uninterrupted one, a process that cannot start again leaves the job on fewer processes with the
same global batches, failures that would recur are not restarted, and the launcher and both
cluster templates agree on which those are. Faults land at step events, never after a delay."""

import json
import os
import re
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
    assert "jaxdist/train/fit.py" in stacks and "most recent call first" in stacks  # the loop
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


def test_a_process_that_raises_after_joining_is_restarted_and_the_job_ends_bitwise_equal(
        two_by_two, tmp_path):
    """Python exits 1 for any uncaught exception: a crash, which a restart may cure."""
    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work",
                  "--max_restarts", "2", env={"FIT_CRASH_AT": "45"})  # first start only
    code, log = run.finish()
    assert code == 0, log[-3000:]
    assert "[p1] RuntimeError: a transient crash (e.g. an I/O error) after joining" in log
    restart = next(x for x in log.splitlines() if x.startswith("[launch] restart 1/2: "))
    assert "process 1 (slot 1) exited with status 1;" in restart, restart  # (0 may fail too)
    assert "resuming at step" in log and "restart 2/2" not in log
    for got, want in zip(_final(tmp_path / "final.npz"), two_by_two):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ending, status, starts, message", [
    ("sys.exit(2)", 2, 1, "not restarted (status 2 (bad input) would recur)"),
    ("sys.exit(65)", 65, 1, "not restarted (status 65 (diverged) would recur)"),
    ("raise RuntimeError('a crash')", 1, 3, "restarts used up: 2"),
    ("sys.exit(69)", 69, 3, "exited with status 69 (unavailable)"),
])
def test_only_final_statuses_are_not_restarted_and_restarts_are_bounded(tmp_path, ending, status,
                                                                        starts, message):
    counter = tmp_path / "starts"
    command = [sys.executable, "-c", f"import jaxdist.cluster as c, sys; c.initialize(); "
               f"open({str(counter)!r}, 'a').write('x'); {ending}"]
    run = Run(["-m", "jaxdist.launch", "-n", "1", "--max_restarts", "2", "--", *command],
              module=None, env=ENV)
    code, log = run.finish()
    assert code == status, log[-2000:]
    assert message in log
    assert len(counter.read_text()) == starts


def test_sigint_to_one_process_stops_the_whole_job_which_saves_and_exits_0(tmp_path):
    """Ctrl-C in one process's terminal takes SIGTERM's path: all agree on a step and save it."""
    from jaxdist.io import Checkpointer

    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work")
    code, log = run.act_at_step(40, lambda: os.kill(_pid(tmp_path / "run", 1), signal.SIGINT))
    assert code == 0, log[-3000:]  # both processes exited 0
    assert "done:" not in log, "the run finished before the signal landed"
    stopped_at = int(log.split("stopped at step ")[1].split()[0])
    assert 40 <= stopped_at < STEPS
    checkpoints = Checkpointer(tmp_path / "work" / "checkpoints")
    assert stopped_at in checkpoints.all_steps()
    checkpoints.close()


@pytest.mark.slow  # the same stop as SIGTERM to one of two processes (test_multihost), one level up
def test_sigterm_to_the_launcher_is_passed_on_and_the_job_saves_and_exits_0(tmp_path):
    run = _launch(tmp_path / "run", tmp_path / "final.npz", tmp_path / "work",
                  "--max_restarts", "2")
    code, log = run.act_at_step(40, lambda: run.send(signal.SIGTERM))
    assert code == 0, log[-3000:]
    assert "passing it on" in log and "restart" not in log
    assert "stopped at step" in log


def test_the_exit_code_table_makes_only_known_outcomes_final():
    from jaxdist.errors import (EXIT_DIVERGED, EXIT_HANG, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE,
                                FINAL, NOT_RESTARTED, restartable)

    assert set(FINAL) == {EXIT_USAGE, EXIT_DIVERGED} and set(NOT_RESTARTED) == {EXIT_OK, *FINAL}
    assert 1 not in FINAL  # an uncaught exception's status is a crash
    for code in (1, EXIT_UNAVAILABLE, EXIT_HANG, 3, 137, -signal.SIGKILL, -signal.SIGSEGV):
        assert restartable(code), code
    assert len({EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_UNAVAILABLE, EXIT_HANG}) == 5


def test_the_cluster_templates_list_exactly_the_final_exit_codes():
    """One source of truth: the SLURM requeue decision and the Kubernetes podFailurePolicy."""
    yaml = pytest.importorskip("yaml")
    from jaxdist.errors import FINAL

    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s-indexed-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")["spec"]
    rules = job["podFailurePolicy"]["rules"]
    fail = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1 and fail[0]["operator"] == "In"
    assert sorted(fail[0]["values"]) == sorted(FINAL)
    assert any(r["action"] == "Ignore" for r in rules)  # disruptions are not failures
    assert job["backoffLimit"] > 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in job["template"]["spec"]["containers"][0]["env"]}
    assert int(env["JAXDIST_INIT_TIMEOUT"]) >= 300  # pods start minutes apart
    service = next(d for d in docs if d["kind"] == "Service")["spec"]
    assert service["publishNotReadyAddresses"] is True  # pod 0's name resolves while it starts

    sbatch = (REPO / "deploy" / "slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in sbatch and 'scontrol requeue "${SLURM_JOB_ID}"' in sbatch
    case = sbatch[sbatch.index("case ${status} in"):sbatch.index("esac")]
    arms = re.findall(r"^\s*([0-9|]+)\)", case, re.MULTILINE)
    final = {int(code) for arm in arms for code in arm.split("|")} - {0}
    assert final == set(FINAL)  # every other status falls through to the requeue
