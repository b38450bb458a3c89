"""The acceptance of self-healing jobs (slow, `-m slow`): `python -m experiments.chaos`.

A 2-process x 4-device MNIST run under `jaxdist.launch --max_restarts 5` survives 3 SIGKILLs and
1 SIGSTOP at random step events and ends bitwise equal to an uninterrupted run; then one process
is killed for good and the job finishes on the one left, equal (rtol 1e-5) to the uninterrupted
run's checkpoint of the step it resumed from, continued on one process.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_job_survives_kills_and_a_freeze_bitwise_and_finishes_on_fewer_processes(tmp_path):
    report = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.chaos", "--workdir",
                           str(tmp_path / "chaos"), "--json", str(report), "--seed", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    s = json.loads(report.read_text())
    assert s["faults_injected"] == 4 and s["survived"] and s["bitwise_equal"]
    assert sorted(f["fault"] for f in s["faults"]) == ["freeze", "kill", "kill", "kill"]
    freeze = next(f for f in s["faults"] if f["fault"] == "freeze")
    assert "hang watchdog" in freeze["cause"], freeze
    assert all(f["steps_lost"] >= 0 for f in s["faults"])
    e = s["elastic"]
    assert e["exit"] == 0 and e["reformed"] and e["max_relative_difference"] <= 1e-5
