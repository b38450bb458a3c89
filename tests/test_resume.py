"""Checkpoints: SIGTERM saves and exits 0, rerunning resumes, and the result is bitwise the same."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO
from experiments.mnist import get_config, loss_fn
from jaxdist import DataParallel, UsageError
from jaxdist.io import Checkpointer
from jaxdist.models import MnistCNN
from jaxdist.train import make_optimizer

ARGS = ["--max_steps", "240", "--eval_examples", "1000", "--progress", "false",
        "--checkpoint_every", "100"]


def _run(workdir, extra=(), terminate_after=None):
    proc = subprocess.Popen([sys.executable, "-m", "experiments.mnist", *ARGS, "--workdir",
                             str(workdir), *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if terminate_after is not None:
        for line in proc.stdout:
            if "training the MNIST CNN" in line:
                break
        time.sleep(terminate_after)
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, out


def _final_params(workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints")
    tx = make_optimizer(get_config().optimizer, 240)  # the run's optimizer: same state tree
    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), tx, loss_fn, devices=1)
    state = ckpt.restore(step, dp.canonical(dp.init()))
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_sigterm_checkpoints_exits_0_and_the_resumed_run_ends_bitwise_equal(mnist, tmp_path):
    code, out = _run(tmp_path / "straight")
    assert code == 0, out[-2000:]
    code, out = _run(tmp_path / "interrupted", terminate_after=4.0)
    assert code == 0, out[-2000:]
    assert "stopped at step" in out
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert 0 < stopped_at < 240
    assert stopped_at in Checkpointer(tmp_path / "interrupted" / "checkpoints").all_steps()
    code, out = _run(tmp_path / "interrupted")
    assert code == 0, out[-2000:]
    assert f"resuming at step {stopped_at}" in out
    for got, want in zip(_final_params(tmp_path / "interrupted", 240),
                         _final_params(tmp_path / "straight", 240)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_a_checkpoint_saved_under_pmap_on_8_restores_under_jit_on_4_and_1(tmp_path, rng):
    batch = (rng.integers(0, 255, (64, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, 64).astype(np.int32))
    dp8 = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, strategy="pmap",
                       devices=8)
    state, _ = dp8.step(dp8.init(), batch)
    saved = dp8.canonical(state)
    ckpt = Checkpointer(tmp_path)
    ckpt.maybe_save(1, saved, force=True)
    ckpt.close()
    for n in (4, 1):
        dp = DataParallel(MnistCNN(rngs=nnx.Rngs(1)), optax.adam(1e-3), loss_fn, devices=n)
        restored = Checkpointer(tmp_path).restore(1, dp.canonical(dp.init()))
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert len(jax.tree.leaves(restored.params)[0].sharding.device_set) == n


def test_a_checkpoint_of_another_optimizer_is_a_clear_error(tmp_path):
    dp = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, devices=1)
    ckpt = Checkpointer(tmp_path)
    ckpt.maybe_save(1, dp.canonical(dp.init()), force=True)
    ckpt.close()
    other = DataParallel(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    with pytest.raises(UsageError, match="does not fit"):
        Checkpointer(tmp_path).restore(1, other.canonical(other.init()))
