"""Test setup shared by every test: 8 virtual CPU devices, set before JAX starts, and MNIST."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_TFDS = REPO.parent / "shared" / "data" / "tensorflow_datasets"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# a run that turns the persistent compilation cache on writes here, not into ~/.cache
os.environ.setdefault("JAXDIST_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxdist-test-xla-"))
if SHARED_TFDS.exists():
    os.environ.setdefault("TFDS_DATA_DIR", str(SHARED_TFDS))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdist.cluster import configure_cpu_devices  # noqa: E402

configure_cpu_devices(8)


def needs_devices(n: int):
    """Skip a test that needs more devices than this run has."""
    return pytest.mark.skipif(jax.device_count() < n, reason=f"needs {n} devices")


def _mnist_available() -> bool:
    import tensorflow_datasets as tfds

    return tfds.builder("mnist", data_dir=os.environ.get("TFDS_DATA_DIR")).is_prepared()


@pytest.fixture(scope="session")
def mnist():
    """(train, test) MNIST splits as arrays; skips when MNIST is not prepared on this machine."""
    if not _mnist_available():
        pytest.skip("MNIST is not prepared; set TFDS_DATA_DIR (CI uses ../shared)")
    from jaxdist.data import load_split

    return load_split("mnist", "train", progress=False), load_split("mnist", "test", progress=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
