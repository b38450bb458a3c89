"""The public API: a user's own NNX model, optax optimizer and loss, data-parallel in a few lines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdist
from conftest import needs_devices


class MLPWithBatchNorm(nnx.Module):
    """A user model with non-parameter state (batch statistics) to carry through the step."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


def _separable_batches(rng, steps, batch=256):
    w = np.array([1.0, -2.0, 0.5, 1.5], np.float32)
    for _ in range(steps):
        x = rng.normal(size=(batch, 4)).astype(np.float32)
        yield x, (x @ w > 0).astype(np.int32)


@needs_devices(8)
@pytest.mark.parametrize("strategy", jaxdist.STRATEGIES)
def test_a_user_model_with_batch_norm_trains_on_8_devices_and_syncs_back(strategy, rng):
    model = MLPWithBatchNorm(nnx.Rngs(0))
    initial_kernel = np.asarray(model.hidden.kernel[...]).copy()
    local = {"local_steps": 2} if strategy == "local_sgd" else {}
    dp = jaxdist.DataParallel(model, optax.adam(1e-2), loss_fn, strategy=strategy, devices=8,
                              **local)
    state = dp.init()
    accuracies = []
    for batch in _separable_batches(rng, 120):
        state, metrics = dp.step(state, batch)
        accuracies.append(float(np.mean(np.asarray(metrics["accuracy"]))))
    assert np.mean(accuracies[-10:]) > 0.9
    dp.sync_model(state)
    assert not np.allclose(np.asarray(model.hidden.kernel[...]), initial_kernel)
    assert float(jnp.abs(model.norm.mean[...]).sum()) > 0  # batch statistics were carried along


def test_the_step_accepts_already_sharded_batches(rng):
    model = MLPWithBatchNorm(nnx.Rngs(0))
    dp = jaxdist.DataParallel(model, optax.sgd(0.1), loss_fn, devices=2)
    batch = next(_separable_batches(rng, 1))
    s1, m1 = dp.step(dp.init(), batch)
    s2, m2 = dp.step(dp.init(), dp.shard_batch(batch))
    assert float(m1["loss"]) == float(m2["loss"])
    assert dp.global_batch_size(dp.shard_batch(batch)) == 256


@pytest.mark.parametrize("options, message", [
    ({"strategy": "fsdp", "local_steps": 4}, "are for strategy local_sgd, not fsdp"),
    ({"strategy": "jit", "grad_reducer": object()}, "runs inside the shard_map step"),
    ({"strategy": "tp", "sync_batch_stats": False}, "per-device statistics"),
    ({"strategy": "zero2"}, "unknown strategy 'zero2'"),
    ({"strategy": "pmap", "mesh": "data=4,tensor=2"}, "runs over the data axis only"),
    ({"strategy": "fsdp", "mesh": "fsdp=3"}, "needs 3 devices"),
])
def test_options_a_strategy_does_not_have_are_clear_errors(options, message):
    with pytest.raises(jaxdist.UsageError, match=message):
        jaxdist.Trainer(MLPWithBatchNorm(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, **options)


def test_evaluate_without_eval_fn_is_a_usage_error():
    dp = jaxdist.DataParallel(MLPWithBatchNorm(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, devices=1)
    with pytest.raises(jaxdist.UsageError, match="eval_fn"):
        dp.evaluate(dp.init(), [])


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 64, rngs=rngs)
        self.b = nnx.Linear(64, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


@needs_devices(8)
@pytest.mark.parametrize("strategy", ["jit", "shard_map", "fsdp", "zero1"])
def test_gradient_accumulation_equals_the_whole_batch_under_every_layout(strategy, rng):
    batches = list(_separable_batches(rng, 3, batch=64))

    def train(microbatches):
        trainer = jaxdist.Trainer(TwoLayers(nnx.Rngs(0)), optax.adam(1e-2), loss_fn,
                                  strategy=strategy, microbatches=microbatches)
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.step(state, batch)
        return [np.asarray(x) for x in jax.tree.leaves(trainer.canonical(state).params)]

    for got, want in zip(train(4), train(1)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
