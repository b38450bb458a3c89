"""`fit_worker.py` with a fault: process UNREADABLE_PROCESS (default 1) cannot read checkpoint step
UNREADABLE_STEP; every open() of a file in it fails with EIO, a transient error, as a flaky
network filesystem would on one host. Each process prints the step it restored.

    python -m jaxdist.launch -n 2 -- python tests/unreadable_worker.py OUT.npz STRATEGY STEPS WORKDIR
"""

import builtins
import errno
import os
import sys

STEP = os.environ.get("UNREADABLE_STEP")
if STEP is not None and os.environ.get("JAXDIST_PROCESS_ID") == os.environ.get(
        "UNREADABLE_PROCESS", "1"):
    _open = builtins.open
    _inside = f"{os.sep}checkpoints{os.sep}{STEP}{os.sep}"

    def _failing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and _inside in os.path.abspath(file):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(file))
        return _open(file, *args, **kwargs)

    builtins.open = _failing_open

import fit_worker  # noqa: E402 - joins the job
import jax  # noqa: E402
from jaxdist.io import Checkpointer  # noqa: E402

_resume = Checkpointer.resume


def _reporting_resume(self, *args, **kwargs):
    restored = _resume(self, *args, **kwargs)
    print(f"process {jax.process_index()} restored step {restored.step}", flush=True)
    return restored


Checkpointer.resume = _reporting_resume

if __name__ == "__main__":
    fit_worker.main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
