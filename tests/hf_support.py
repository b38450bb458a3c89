"""The transformers reference for tests/test_hf.py: `scripts/reference_env.sh` makes its venv
(once per machine), `hf_reference.py` runs there in a subprocess. Tests that use the
`transformers` fixture are skipped, with the script's reason, where it cannot be made."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

PYTHON = REPO / ".venv-reference" / "bin" / "python"
SCRIPT = Path(__file__).with_name("hf_reference.py")


class Transformers:
    """Runs `hf_reference.py` jobs (see its docstring) in one interpreter start."""

    def run(self, jobs: list[dict]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(jobs, f)
            f.flush()
            done = subprocess.run([str(PYTHON), str(SCRIPT), "jobs", f.name],
                                  capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise AssertionError(f"hf_reference.py failed:\n{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def transformers() -> Transformers:
    done = subprocess.run(["bash", str(REPO / "scripts" / "reference_env.sh")],
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
        pytest.skip(f"no transformers reference: {reason}")
    return Transformers()
