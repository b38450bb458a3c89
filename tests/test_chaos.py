"""The acceptance of self-healing jobs (slow, `-m slow`): `python -m drills.chaos`.

A 2-process x 4-device MNIST run under `jaxdist.launch --max_restarts 5` survives 3 SIGKILLs and
1 SIGSTOP at random step events and ends bitwise equal to an uninterrupted run; then one process
is killed for good and the job finishes on the one left, equal (rtol 1e-5) to the uninterrupted
run's checkpoint of the step it resumed from, continued on one process. (Fast:) it empties only
a work dir it made, never one it did not (`--workdir .`).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from drills import chaos
from jaxdist.errors import EXIT_USAGE


@pytest.mark.slow
def test_a_job_survives_kills_and_a_freeze_bitwise_and_finishes_on_fewer_processes(tmp_path):
    report = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "drills.chaos", "--workdir",
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


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_workdir_chaos_did_not_make_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "code.py").write_text("print('keep me')\n")
    (mine / "notes.txt").write_text("keep me too\n")
    before = _tree(mine)
    for workdir, cwd in ((".", mine), (str(mine), REPO)):  # `--workdir .` and a path
        proc = subprocess.run([sys.executable, "-m", "drills.chaos", "--workdir", workdir],
                              cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert proc.stderr.strip() == (
            f"error: --workdir {workdir} was not made by drills.chaos (it has files and no "
            f".jaxdist-chaos marker) and would be emptied; name a new or empty directory")
        assert proc.stdout == "" and _tree(mine) == before


def test_chaos_empties_only_a_workdir_it_made_or_an_empty_one(tmp_path):
    new = tmp_path / "new" / "chaos"
    chaos.prepare_workdir(new)  # created, with the marker
    assert _tree(new) == [chaos.MARKER]
    (new / "reference").mkdir()
    (new / "reference" / "run.log").write_text("an earlier run\n")
    (new / "chaos.log").write_text("an earlier run\n")
    chaos.prepare_workdir(new)  # made by chaos: emptied, marked again
    assert _tree(new) == [chaos.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    chaos.prepare_workdir(empty)  # nothing to lose
    assert _tree(empty) == [chaos.MARKER]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(chaos.UsageError, match="is not a directory"):
        chaos.prepare_workdir(afile)
    with pytest.raises(chaos.UsageError, match="cannot be created"):
        chaos.prepare_workdir(afile / "sub")
    assert afile.read_text() == "x"
