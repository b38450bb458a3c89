"""`jaxdist.fit` owns the services for any model and data: a run killed at any step resumes
bitwise, SIGTERM saves and returns, the non-finite guard rolls back, keep-best ranks by the
metric named, hooks are callbacks, and 2 processes x 4 devices equal 1 x 8."""

import os
import random
import signal
import subprocess
import sys

import numpy as np
import optax
import pytest
from flax import nnx

import jaxdist
from conftest import REPO
from jaxdist.io import Checkpointer
from runs import Run
from task import QUIET, MLP, arrays, eval_fn, leaves, loss_fn

WORKER = str(REPO / "tests" / "fit_worker.py")
STEPS = 120
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _worker(out, strategy="jit", workdir=None, env=None) -> Run:
    args = [WORKER, str(out), strategy, str(STEPS), *([str(workdir)] if workdir else [])]
    return Run(args, module=None, env={**ENV, **(env or {})})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "final.npz"
    code, log = _worker(out).finish()
    assert code == 0, log[-2000:]
    with np.load(out) as f:
        return [f[k] for k in f.files]


def _final(out):
    with np.load(out) as f:
        return [f[k] for k in f.files]


def _rerun_resumes_bitwise_equal(tmp_path, step, uninterrupted):
    """The same command again resumes at `step` and ends bitwise equal to `uninterrupted`."""
    code, log = _worker(tmp_path / "final.npz", workdir=tmp_path / "work").finish()
    assert code == 0 and f"resuming at step {step}" in log, log[-2000:]
    for got, want in zip(_final(tmp_path / "final.npz"), uninterrupted):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("trial", range(2))
def test_a_run_killed_at_a_random_step_and_rerun_ends_bitwise_equal(uninterrupted, tmp_path,
                                                                     trial):
    kill_at = random.Random(trial).randint(5, STEPS // 2)
    run = _worker(tmp_path / "final.npz", workdir=tmp_path / "work")
    try:
        run.wait_for_step(kill_at)
        run.send(signal.SIGKILL)
        code, log = run.finish()
    finally:
        run.kill()
    assert code == -signal.SIGKILL and "done:" not in log
    ckpt = Checkpointer(tmp_path / "work" / "checkpoints")
    kept = ckpt.all_steps()
    ckpt.close()
    code, log = _worker(tmp_path / "final.npz", workdir=tmp_path / "work").finish()
    assert code == 0, log[-2000:]
    assert not kept or f"resuming at step {max(kept)}" in log
    for got, want in zip(_final(tmp_path / "final.npz"), uninterrupted):
        np.testing.assert_array_equal(got, want)


def test_sigterm_saves_the_current_step_and_returns_then_the_rerun_ends_bitwise_equal(
        uninterrupted, tmp_path):
    run = _worker(tmp_path / "final.npz", workdir=tmp_path / "work")
    code, log = run.act_at_step(40, lambda: run.send(signal.SIGTERM))
    assert code == 0, log[-2000:]
    stopped_at = int(log.split("stopped at step ")[1].split()[0])
    assert 40 <= stopped_at < STEPS
    ckpt = Checkpointer(tmp_path / "work" / "checkpoints")
    assert stopped_at in ckpt.all_steps()
    ckpt.close()
    _rerun_resumes_bitwise_equal(tmp_path, stopped_at, uninterrupted)


def test_2_processes_x_4_devices_equal_1_process_x_8_through_fit(uninterrupted, tmp_path):
    out = tmp_path / "two.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdist.launch", "-n", "2", "--devices_per_process", "4", "--",
         sys.executable, WORKER, str(out), "jit", str(STEPS)],
        cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 8 devices of 2 process(es)" in proc.stdout
    for got, want in zip(_final(out), uninterrupted):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_guard_rolls_back_to_the_last_checkpoint_after_k_nonfinite_steps(tmp_path):
    x, y = arrays()
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.05), loss_fn, devices=2)
    poisoned = {13, 14, 15}  # the batches of these steps are NaN

    data = jaxdist.data.from_arrays((x, y), global_batch=32, seed=0)
    batches = data.batches

    def with_nans(start_step=0):
        for k, (bx, by) in enumerate(batches(start_step), start=start_step + 1):
            yield (np.full_like(bx, np.nan) if k in poisoned else bx), by

    data.batches = with_nans
    lines = []
    run = jaxdist.fit(trainer, data, steps=30,
                      checkpoint=jaxdist.CheckpointConfig(workdir=str(tmp_path), every=10),
                      guard=jaxdist.GuardConfig(nonfinite_limit=3), observe=QUIET,
                      log=lines.append)
    assert any("rolled back to the checkpoint of step 10" in line for line in lines), lines
    assert not run.stopped and all(np.isfinite(a).all() for a in leaves(run.state.params))


def test_keep_best_keeps_the_checkpoint_best_by_the_metric_named_lowest_first(tmp_path):
    x, y = arrays()
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-2), loss_fn, devices=2,
                              eval_fn=eval_fn)
    run = jaxdist.fit(trainer, jaxdist.data.from_arrays((x, y), global_batch=64), steps=40,
                      eval=jaxdist.EvalConfig(every=10),
                      eval_data=jaxdist.data.from_arrays(arrays(256, 1), global_batch=64),
                      checkpoint=jaxdist.CheckpointConfig(workdir=str(tmp_path), keep=1,
                                                          keep_best=1, best_metric="test_loss",
                                                          best_mode="min"),
                      observe=QUIET, log=lambda _: None)
    losses = {r["step"]: r["test_loss"] for r in run.history}
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, keep_best=1, best_metric="test_loss",
                        best_mode="min")
    assert ckpt.best_step() == min(losses, key=losses.get)
    assert set(ckpt.all_steps()) == {40, min(losses, key=losses.get)}
    ckpt.close()


def test_callbacks_see_the_start_every_step_its_metrics_the_evaluations_and_the_end():
    seen = []

    class Record(jaxdist.Callback):
        def on_fit_start(self, trainer, state, step):
            seen.append(("start", step))

        def on_step_end(self, step, state):
            seen.append(("step", step))
            return step == 7  # stop early

        def on_metrics(self, step, metrics):
            seen.append(("metrics", step, "loss" in metrics and "accuracy" in metrics))

        def on_fit_end(self, result):
            seen.append(("end", result.stopped_at))

    x, y = arrays(512)
    trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=2)
    run = jaxdist.fit(trainer, jaxdist.data.from_arrays((x, y), global_batch=64), steps=20,
                      callbacks=[Record()], observe=QUIET, log=lambda _: None)
    assert run.stopped and run.stopped_at == 7
    assert seen[0] == ("start", 0) and seen[-1] == ("end", 7)
    assert [e[1] for e in seen if e[0] == "step"] == list(range(1, 8))
    assert [e[1] for e in seen if e[0] == "metrics"] == list(range(1, 8))
    assert all(e[2] for e in seen if e[0] == "metrics")


def test_resuming_with_another_seed_is_refused(tmp_path):
    x, y = arrays(512)

    def run(seed):
        trainer = jaxdist.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=2)
        return jaxdist.fit(trainer, jaxdist.data.from_arrays((x, y), global_batch=64, seed=seed),
                           steps=4, observe=QUIET, log=lambda _: None,
                           checkpoint=jaxdist.CheckpointConfig(workdir=str(tmp_path), every=2))

    run(0)
    with pytest.raises(jaxdist.UsageError, match="trained with seed 0, this run has 1"):
        run(1)


@pytest.mark.parametrize("moment, stop_step", [("compile", 1), ("eval", 32), ("save", 11)])
def test_sigterm_during_the_first_compile_an_evaluation_or_a_save_in_flight_saves_and_exits_0(
        uninterrupted, tmp_path, moment, stop_step):
    """The worker signals itself at that moment: while its first step is traced, after the first
    batch of the evaluation at step 32 (it stops there, not after the next step), or at step 10
    just before that save is issued (the stop at step 11 saves while it may still be written)."""
    code, log = _worker(tmp_path / "final.npz", workdir=tmp_path / "work",
                        env={"FIT_SIGTERM_AT": moment}).finish()
    assert code == 0, log[-2000:]
    assert f"sending SIGTERM to myself ({moment})" in log
    assert f"stopped at step {stop_step}" in log, log[-2000:]
    ckpt = Checkpointer(tmp_path / "work" / "checkpoints")
    assert stop_step in ckpt.all_steps()
    ckpt.close()
    _rerun_resumes_bitwise_equal(tmp_path, stop_step, uninterrupted)
