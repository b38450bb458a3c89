"""Checkpoints restore onto other layouts, bad checkpoints fall back or fail clearly, non-finite
steps are skipped everywhere alike, and RNG state survives a restart."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import REPO, needs_devices
from jaxdist.models.classification import mnist_loss as loss_fn
import jaxdist
from jaxdist import STRATEGIES, Trainer, UsageError
from jaxdist.errors import TransientError
from jaxdist.io import Checkpointer, integrity
from jaxdist.io.checkpoint import CheckpointUnavailable
from jaxdist.models import MnistCNN
from jaxdist.train.guard import GuardConfig, NonFiniteGuard, RollBack, TrainingDiverged
from task import QUIET


def _batch(rng, n=64):
    return (rng.integers(0, 255, (n, 28, 28, 1)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def _leaves(tree):
    def host(x):
        is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(x) if is_key else x)

    return [host(x) for x in jax.tree.leaves(tree)]


def _save(directory, steps, state, **kw):
    ckpt = Checkpointer(directory, every=1, **kw)
    for step in steps:
        ckpt.save(step, state)
    ckpt.close()


@needs_devices(8)
def test_a_checkpoint_saved_under_pmap_on_8_restores_under_jit_on_4_and_1(tmp_path, rng):
    dp8 = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, strategy="pmap",
                  devices=8)
    state, _ = dp8.step(dp8.init(), _batch(rng))
    saved = dp8.canonical(state)
    _save(tmp_path, [1], saved)
    for n in (4, 1):
        dp = Trainer(MnistCNN(rngs=nnx.Rngs(1)), optax.adam(1e-3), loss_fn, devices=n)
        restored, _ = Checkpointer(tmp_path).restore(1, dp.canonical(dp.init()))
        for got, want in zip(_leaves(restored), _leaves(saved)):
            np.testing.assert_array_equal(got, want)
        assert len(jax.tree.leaves(restored.params)[0].sharding.device_set) == n


def test_a_checkpoint_of_another_optimizer_is_a_clear_error_not_a_fallback(tmp_path):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, devices=1)
    _save(tmp_path, [1], dp.canonical(dp.init()))
    other = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    with pytest.raises(UsageError, match="does not fit"):
        Checkpointer(tmp_path).restore_latest(other.canonical(other.init()))
    assert Checkpointer(tmp_path).all_steps() == [1]  # still there


# expected: orbax's reader of the truncated array leaves callbacks for an asyncio loop it has
# already closed ("Event loop is closed", raised where Python can only report it)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate array data", "garble metadata", "remove state",
                                    "remove the commit record"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(
        tmp_path, damage, capsys):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, devices=1)
    state = dp.canonical(dp.init())
    _save(tmp_path, [10, 20], state)
    newest = tmp_path / "20" / "state"
    if damage == "truncate array data":
        for f in [p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"]:
            os.truncate(f, f.stat().st_size // 2)
    elif damage == "garble metadata":
        (newest / "_METADATA").write_text("{not json")
    elif damage == "remove the commit record":
        (tmp_path / "20" / "_CHECKPOINT_METADATA").unlink()
    else:
        for f in sorted(newest.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        newest.rmdir()
    step, restored, _ = Checkpointer(tmp_path).restore_latest(state)
    assert step == 10
    for got, want in zip(_leaves(restored), _leaves(state)):
        np.testing.assert_array_equal(got, want)
    assert "checkpoint step 20 is damaged" in capsys.readouterr().err
    aside = [p.name for p in Path(tmp_path).iterdir() if p.name.startswith("20.damaged")]
    assert len(aside) == 1  # moved, not deleted


class _FailingReads:
    """Replaces orbax's array reads: the first `failures` reads of step `step` (any step: None)
    raise `error`, the others read as usual."""

    def __init__(self, monkeypatch, error, failures, step=None):
        self.error, self.failures, self.step, self.calls = error, failures, step, 0
        original = ocp.StandardCheckpointHandler.restore

        def restore(handler, directory, *args, **kwargs):
            if self.step is None or Path(directory).parent.name == str(self.step):
                self.calls += 1
                if self.calls <= self.failures:
                    raise self.error
            return original(handler, directory, *args, **kwargs)

        monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
        monkeypatch.setattr(integrity, "RETRY_DELAYS", (0.0, 0.0))


def _two_steps(tmp_path):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, devices=1)
    state = dp.canonical(dp.init())
    _save(tmp_path, [10, 20], state)
    return state


def _nothing_set_aside(tmp_path):
    assert Checkpointer(tmp_path).all_steps() == [10, 20]
    assert not [p for p in Path(tmp_path).iterdir() if "." in p.name.strip(".")]


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"), TimeoutError("read timed out"),
    ValueError('FAILED_PRECONDITION: Error reading "params.fc1" in OCDBT database at local file '
               '"/ckpt/20/state/": [OS error: Input/output error]')],
    ids=["EIO", "timeout", "EIO inside TensorStore"])
def test_a_transient_read_error_is_retried_and_the_step_is_kept(tmp_path, monkeypatch, error,
                                                                 capsys):
    state = _two_steps(tmp_path)
    reads = _FailingReads(monkeypatch, error, failures=2)
    step, restored, _ = Checkpointer(tmp_path).restore_latest(state)
    assert step == 20 and reads.calls == 3  # two failures, then the read that worked
    assert "(transient); trying again" in capsys.readouterr().err
    _nothing_set_aside(tmp_path)


def test_a_step_that_stays_unreadable_is_kept_and_the_previous_one_used(tmp_path, monkeypatch,
                                                                         capsys):
    state = _two_steps(tmp_path)
    reads = _FailingReads(monkeypatch, OSError(errno.EIO, "Input/output error"), failures=99,
                          step=20)
    step, _, _ = Checkpointer(tmp_path).restore_latest(state)
    assert step == 10 and reads.calls == 3
    _nothing_set_aside(tmp_path)  # 20 is kept for the next start to read


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"),
                                   RuntimeError("an error that shows no damage")],
                         ids=["EIO", "unclassified"])
def test_when_no_step_can_be_read_now_the_restore_fails_restartable_keeping_them(
        tmp_path, monkeypatch, error):
    state = _two_steps(tmp_path)
    _FailingReads(monkeypatch, error, failures=99)
    with pytest.raises(CheckpointUnavailable, match="could not be read now") as raised:
        Checkpointer(tmp_path).restore_latest(state)
    assert isinstance(raised.value, TransientError)  # entry points exit restartable
    _nothing_set_aside(tmp_path)


def test_when_only_process_1_cannot_read_the_newest_step_both_resume_from_the_previous_one(
        tmp_path):
    """A flaky read on one host: process 1's reads of step 20 fail (EIO, every time). Both
    processes restore step 10, train on together, and step 20 is kept."""
    work = tmp_path / "work"

    def launch(steps, **env):
        return subprocess.run(
            [sys.executable, "-m", "jaxdist.launch", "-n", "2", "--devices_per_process", "2",
             "--", sys.executable, str(REPO / "tests" / "unreadable_worker.py"),
             str(tmp_path / "out.npz"), "jit", str(steps), str(work)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                 **env})

    first = launch(20)  # saves steps 10 and 20
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = launch(30, UNREADABLE_STEP="20")
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "[p0] process 0 restored step 10" in out and "[p1] process 1 restored step 10" in out
    assert "checkpoint step 20" in out and "it is kept" in out  # process 1 said why
    assert "resuming at step 10" in out and "done:" in out
    ckpt = Checkpointer(work / "checkpoints")
    assert ckpt.all_steps() == [10, 20, 30]
    ckpt.close()
    assert not [p for p in (work / "checkpoints").iterdir() if "damaged" in p.name]


_CRASH_WHILE_DELETING = """
import os, signal, sys
import optax
from flax import nnx
from jaxdist import Trainer
from jaxdist.errors import TransientError
from jaxdist.io import Checkpointer, integrity
from jaxdist.io.checkpoint import CheckpointUnavailable
from jaxdist.models import MnistCNN
from jaxdist.models.classification import mnist_loss

unlink = os.unlink
def crash_inside_step_1(path, *, dir_fd=None):  # kill -9 at the first file removed from step 1
    where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
    if "1" in os.path.relpath(os.path.join(where, path), sys.argv[1]).split(os.sep)[:-1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return unlink(path, dir_fd=dir_fd)
os.unlink = crash_inside_step_1

dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), mnist_loss, devices=1)
ckpt = Checkpointer(sys.argv[1], every=1, keep=1)
for step in (1, 2):  # saving 2 deletes 1
    ckpt.save(step, dp.canonical(dp.init()))
ckpt.close()
"""


def test_a_crash_while_an_old_checkpoint_is_deleted_leaves_only_whole_checkpoints(tmp_path):
    import signal
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CRASH_WHILE_DELETING, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]  # it did die mid-delete
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [2]
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    ckpt.restore(2, dp.canonical(dp.init()))
    ckpt.close()
    assert not list(tmp_path.glob(".deleting/*"))  # the half-removed step is cleared at start


def test_keep_best_keeps_the_most_accurate_checkpoint_beside_the_newest(tmp_path):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    state = dp.canonical(dp.init())
    ckpt = Checkpointer(tmp_path, every=1, keep=2, keep_best=1, best_metric="test_accuracy")
    for step, accuracy in zip([1, 2, 3, 4, 5], [0.90, 0.97, 0.80, 0.85, 0.70]):
        ckpt.save(step, state, metrics={"test_accuracy": accuracy})
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="test_accuracy")
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2


@needs_devices(8)
@pytest.mark.parametrize("strategy", [n for n, s in STRATEGIES.items() if s.parallelism == "data"])
def test_a_nan_in_one_replicas_shard_skips_the_update_on_every_replica(strategy, rng):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3), loss_fn, strategy=strategy,
                 devices=8)
    state, _ = dp.step(dp.init(), _batch(rng))
    before = _leaves(dp.canonical(state).params)
    images, labels = _batch(rng)
    images[5, 3, 3, 0] = np.nan  # in the first device's shard only
    state, metrics = dp.step(state, (images, labels))
    assert float(np.max(np.asarray(metrics["nonfinite"]))) == 1.0
    if strategy != "local_sgd":  # local SGD replicas are independent: only the bad one skips
        assert float(np.min(np.asarray(metrics["nonfinite"]))) == 1.0
        for got, want in zip(_leaves(dp.canonical(state).params), before):
            np.testing.assert_array_equal(got, want)
    state, metrics = dp.step(state, _batch(rng))
    assert float(np.max(np.asarray(metrics["nonfinite"]))) == 0.0
    assert all(np.isfinite(x).all() for x in _leaves(dp.canonical(state).params))


def _cnn_sgd():
    return Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.01), loss_fn, devices=1)


def _nan_batches(rng, bad_steps, steps=8):
    batches = []
    for step in range(1, steps + 1):
        images, labels = _batch(rng, 32)
        if step in bad_steps:
            images[:] = np.nan
        batches.append((images, labels))
    return batches


def test_after_k_consecutive_nonfinite_steps_the_guard_asks_to_roll_back_to_before_them(rng):
    dp = _cnn_sgd()
    guard = NonFiniteGuard(GuardConfig(nonfinite_limit=3), log=lambda _: None)
    steps = jaxdist.training_steps(dp, dp.init(), iter(_nan_batches(rng, {2, 4, 5, 6})),
                                   start=0, stop=8)
    rollbacks, reply = [], None
    while True:
        try:
            info = steps.send(reply)
        except StopIteration:
            break
        reply = None
        try:
            if info.metrics is not None:
                guard.on_metrics(*info.metrics)
        except RollBack as e:
            rollbacks.append(e.first_bad_step)
            reply = dp.init()  # what fit takes from the last checkpoint before the window
    assert rollbacks == [4]  # steps 4, 5, 6 in a row; the lone step 2 only skipped
    assert guard.skipped == 4


def test_without_a_checkpoint_the_guard_stops_with_a_clear_message(rng):
    images, labels = _batch(rng, 256)
    images = images.astype(np.float32)
    images[:] = np.nan
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps"):
        jaxdist.fit(_cnn_sgd(), jaxdist.data.from_arrays((images, labels), global_batch=32),
                    steps=8, guard=GuardConfig(nonfinite_limit=3), observe=QUIET,
                    log=lambda _: None)


class DropoutNet(nnx.Module):
    """A model whose output depends on its RNG stream."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(784, 10, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.log_softmax(self.fc(self.drop(x.reshape(x.shape[0], -1) / 255.0)))


def test_the_rng_stream_is_checkpointed_so_dropout_resumes_exactly(tmp_path, rng):
    batches = [_batch(rng, 32) for _ in range(6)]

    def trainer():
        return Trainer(DropoutNet(nnx.Rngs(0, dropout=1)), optax.adam(1e-2), loss_fn,
                       devices=2)

    dp = trainer()
    state = dp.init()
    for batch in batches:
        state, _ = dp.step(state, batch)
    straight = _leaves(dp.canonical(state))

    dp = trainer()
    state = dp.init()
    for batch in batches[:3]:
        state, _ = dp.step(state, batch)
    _save(tmp_path, [3], dp.canonical(state))
    dp = trainer()
    restored, _ = Checkpointer(tmp_path).restore(3, dp.canonical(dp.init()))
    state = dp.place(restored)
    for batch in batches[3:]:
        state, _ = dp.step(state, batch)
    for got, want in zip(_leaves(dp.canonical(state)), straight):
        np.testing.assert_array_equal(got, want)
