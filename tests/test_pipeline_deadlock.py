"""A 1F1B pipeline whose stages run collectives (FSDP gathers, tensor-parallel reductions) never
deadlocks: its ticks have no conditional, so every device runs the same collectives in the same
order. Its earlier form with a `lax.switch` per tick hung XLA:CPU about 1 run in 4, so the check
is many fresh processes, each of which must finish. The hang was in running the program, not in
compiling it: the runs share a compilation cache, so only the first compiles."""

import subprocess
import sys
from pathlib import Path

import pytest

RUNS = 20
FAIL_SAFE_SECONDS = 300  # one run: seconds from the cache; only a hang reaches this
WORKER = Path(__file__).resolve().parent / "pipeline_worker.py"


@pytest.mark.slow  # 20 fresh processes
@pytest.mark.timeout(RUNS * FAIL_SAFE_SECONDS)
def test_twenty_fresh_processes_of_a_1f1b_step_on_8_devices_all_finish(tmp_path):
    losses = []
    for run in range(RUNS):
        try:
            done = subprocess.run([sys.executable, str(WORKER), "fsdp=2,pipeline=2,tensor=2",
                                   str(tmp_path / "cache")], capture_output=True, text=True,
                                  timeout=FAIL_SAFE_SECONDS, cwd=WORKER.parent)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run + 1} of {RUNS} did not finish in {FAIL_SAFE_SECONDS} s: "
                        f"a hang")
        assert done.returncode == 0, f"run {run + 1}: {done.stderr[-2000:]}"
        losses.append(done.stdout.strip().splitlines()[-1])
    assert len(set(losses)) == 1, losses  # and every run computed the same
