"""The README's examples run as written."""

import os
import re
import subprocess
import sys

from conftest import REPO


def _example(name: str) -> str:
    text = (REPO / "README.md").read_text()
    marker = f"<!-- example: {name} "
    after = text[text.index(marker):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_your_own_model_and_data_trains_under_fsdp_on_8_devices_and_resumes(tmp_path):
    code = _example("own-model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fc1 per device (784, 128) of (784, 1024)" in first.stdout
    loss = float(first.stdout.split("loss ")[-1].split(";")[0])
    assert loss < 1.0  # from ln 10 = 2.3
    assert "ReplicationWarning" not in first.stderr
    longer = code.replace("epochs=3", "epochs=4")  # the same work dir: resumes, trains one more
    second = subprocess.run([sys.executable, "-c", longer], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 48" in second.stdout
