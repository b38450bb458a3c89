"""Regression for the CPU collective deadlock: 8-device training in fresh processes never hangs.

With jaxlib 0.10.2 on a 2-core machine, jit and shard_map steps over 8 virtual CPU devices hung in
~60% of process starts. Each run here is a new process (the hang shows per start); a run past its
timeout is SIGKILLed and fails the test. The 20-runs-per-strategy proof is `-m slow`.
"""

import pytest

from drills.reliability import run_once
from jaxdist import STRATEGIES

DATA_PARALLEL = [name for name, s in STRATEGIES.items() if s.parallelism == "data"]


@pytest.mark.parametrize("strategy", DATA_PARALLEL)
def test_8_device_training_process_finishes(strategy, mnist):
    outcome, seconds = run_once(strategy, steps=40, devices=8, timeout=150, extra=[])
    assert outcome == "ok", f"{outcome} after {seconds:.0f} s"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", DATA_PARALLEL)
def test_20_consecutive_8_device_trainings_never_hang(strategy, mnist):
    for run in range(20):
        outcome, seconds = run_once(strategy, steps=100, devices=8, timeout=180, extra=[])
        assert outcome == "ok", f"run {run + 1}: {outcome} after {seconds:.0f} s"
