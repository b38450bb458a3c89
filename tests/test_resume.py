"""A run stopped at any moment (SIGTERM, kill -9, one of several processes preempted) resumes to
bitwise the result of an uninterrupted run, under local SGD and DiLoCo too."""

import random
import signal

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdist
from conftest import needs_devices
from experiments.mnist import get_config, loss_fn
from jaxdist import Trainer
from jaxdist.io import Checkpointer
from jaxdist.launch import free_port
from jaxdist.models import MnistCNN
from jaxdist.train import make_optimizer
from runs import STEP_EVENTS, Run
from task import QUIET, MLP, arrays
from task import leaves as task_leaves
from task import loss_fn as task_loss

STEPS = 240
ARGS = ["--max_steps", str(STEPS), "--eval_examples", "1000", "--checkpoint_every", "20",
        *STEP_EVENTS]


def _start(workdir, extra=(), env=None) -> Run:
    return Run([*ARGS, "--workdir", str(workdir), *extra], env=env)


def _run(workdir, extra=(), signal_at_step=None, sig=signal.SIGTERM):
    """Runs to the end, or sends `sig` once the run reports step `signal_at_step`."""
    run = _start(workdir, extra)
    try:
        if signal_at_step is not None:
            run.wait_for_step(signal_at_step)
            run.send(sig)
        return run.finish()
    finally:
        run.kill()


def _assert_interrupted_mid_run(out):
    assert "done:" not in out, "the run finished before the signal landed"


def _restored(workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints")
    tx = make_optimizer(get_config().optimizer, STEPS)  # the run's optimizer: same state tree
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), tx, loss_fn, devices=1)
    state, meta = ckpt.restore(step, dp.canonical(dp.init()))
    ckpt.close()
    return state, meta


def _params(workdir, step=STEPS):
    return [np.asarray(x) for x in jax.tree.leaves(_restored(workdir, step)[0].params)]


def _assert_bitwise_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.fixture(scope="module")
def uninterrupted(mnist, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    code, out = _run(workdir)
    assert code == 0, out[-2000:]
    return _params(workdir)


def test_sigterm_checkpoints_the_current_step_exits_0_and_the_rerun_ends_bitwise_equal(
        uninterrupted, tmp_path):
    code, out = _run(tmp_path, signal_at_step=60)
    assert code == 0, out[-2000:]
    _assert_interrupted_mid_run(out)
    stopped_at = int(out.split("stopped at step ")[1].split()[0])
    assert 60 <= stopped_at < STEPS
    state, meta = _restored(tmp_path, stopped_at)
    assert int(state.step) == stopped_at and meta["data_position"] == stopped_at
    code, out = _run(tmp_path)
    assert code == 0, out[-2000:]
    assert f"resuming at step {stopped_at}" in out
    _assert_bitwise_equal(_params(tmp_path), uninterrupted)


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow)])  # 2nd: -m slow
def test_kill_9_at_a_random_moment_loses_only_the_steps_since_the_last_checkpoint(
        uninterrupted, tmp_path, trial):
    kill_at = random.Random(trial).randint(10, STEPS // 2)
    code, out = _run(tmp_path, signal_at_step=kill_at, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    _assert_interrupted_mid_run(out)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    kept = ckpt.all_steps()
    ckpt.close()
    for step in kept:  # no partial save is ever offered as a step
        _restored(tmp_path, step)
    code, out = _run(tmp_path)
    assert code == 0, out[-2000:]
    resumed = f"resuming at step {max(kept)}" if kept else "training the MNIST CNN"
    assert resumed in out
    _assert_bitwise_equal(_params(tmp_path), uninterrupted)


def test_resuming_with_another_global_batch_is_a_clear_error(mnist, tmp_path):
    code, out = _run(tmp_path, ["--max_steps", "4", "--checkpoint_every", "2"])
    assert code == 0, out[-2000:]
    code, out = _run(tmp_path, ["--max_steps", "8", "--global_batch", "64"])
    assert code == 2
    assert "trained with global_batch 128, this run has 64" in out


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(mnist, tmp_path):
    port = free_port()
    runs = [_start(tmp_path, ["--checkpoint_every", "1000"],
                   env={"JAXDIST_COORDINATOR": f"127.0.0.1:{port}", "JAXDIST_NUM_PROCESSES": "2",
                        "JAXDIST_PROCESS_ID": str(i), "JAXDIST_CPU_DEVICES": "2"})
            for i in range(2)]
    try:
        runs[0].wait_for_step(40)  # only process 0 prints progress
        runs[1].send(signal.SIGTERM)
        results = [run.finish() for run in runs]
    finally:
        for run in runs:
            run.kill()
    for code, out in results:
        assert code == 0, out[-3000:]
        _assert_interrupted_mid_run(out)
    stopped_at = int(results[0][1].split("stopped at step ")[1].split()[0])
    assert 40 <= stopped_at < STEPS
    state, _ = _restored(tmp_path, stopped_at)
    assert int(state.step) == stopped_at


def _local_sgd(devices=4, diloco=False):
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True) if diloco else None
    return jaxdist.Trainer(MLP(nnx.Rngs(0, dropout=1)), optax.adam(3e-3), task_loss,
                           strategy=jaxdist.LocalSGD(every=4, outer=outer), devices=devices)


def _task_fit(trainer, workdir=None, callbacks=(), log=lambda _: None):
    return jaxdist.fit(trainer, jaxdist.data.from_arrays(arrays(), global_batch=64, seed=0),
                       steps=16, callbacks=callbacks, observe=QUIET, log=log,
                       checkpoint=jaxdist.CheckpointConfig(
                           workdir=None if workdir is None else str(workdir), every=100))


class _StopAt(jaxdist.Callback):
    """Stops the run after `step`: fit saves that step and returns."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, state):
        return step == self.step


@needs_devices(4)
@pytest.mark.parametrize("diloco", [False, True], ids=["local_sgd", "diloco"])
def test_local_sgd_stopped_between_averaging_points_resumes_bitwise_equal(tmp_path, diloco):
    """Stopped at step 6, two steps after an average (H=4): the replicas' parameters, Adam moments
    and BatchNorm statistics differ, and the checkpoint keeps each replica's."""
    straight = _task_fit(_local_sgd(diloco=diloco))
    stopped = _task_fit(_local_sgd(diloco=diloco), tmp_path, callbacks=[_StopAt(6)])
    assert stopped.stopped_at == 6
    lines = []
    resumed = _task_fit(_local_sgd(diloco=diloco), tmp_path, log=lines.append)
    assert "resuming at step 6" in "\n".join(lines)
    _assert_bitwise_equal(task_leaves(resumed.state), task_leaves(straight.state))


@needs_devices(4)
@pytest.mark.parametrize("other", ["2 replicas", "jit"])
def test_local_sgd_replicas_resumed_on_another_replica_count_start_from_their_mean(
        tmp_path, capsys, other):
    stopped = _task_fit(_local_sgd(), tmp_path, callbacks=[_StopAt(6)])
    mean = task_leaves(_local_sgd().canonical(stopped.state))
    trainer = _local_sgd(devices=2) if other == "2 replicas" else jaxdist.Trainer(
        MLP(nnx.Rngs(0, dropout=1)), optax.adam(3e-3), task_loss, devices=2)
    seen = []

    class Start(jaxdist.Callback):
        def on_fit_start(self, trainer, state, step):
            seen.append(task_leaves(trainer.canonical(state)))

    run = _task_fit(trainer, tmp_path, callbacks=[Start()])
    here = "this run has 2" if other == "2 replicas" else "this run has none"
    assert (f"checkpoint step 6 holds the states of 4 local-SGD replicas, {here}: resuming "
            f"from their mean (not bitwise)") in capsys.readouterr().err
    _assert_bitwise_equal(seen[0], mean)
    assert not run.stopped and all(np.isfinite(x).all() for x in task_leaves(run.state.params))
