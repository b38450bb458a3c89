"""Every strategy trains a user's model with BatchNorm and Dropout as one device would over the
global batch: batch statistics over the global batch, dropout masks independent across replicas."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from jaxdist import Jit, LocalSGD, Pmap, ShardMap, Trainer, UsageError

FEATURES = 16


class MLP(nnx.Module):
    """A user's model, nothing jaxdist-specific: Linear -> BatchNorm -> ReLU -> Dropout -> Linear."""

    def __init__(self, rate: float, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(FEATURES, 32, use_bias=False, rngs=rngs)  # BatchNorm centres it
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(jax.nn.relu(self.norm(self.fc1(x)))))


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batches(k, n=64, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, FEATURES)).astype(np.float32) * 3 + 1,
             rng.integers(0, 4, n).astype(np.int32)) for _ in range(k)]


def _train(strategy, devices, batches, rate=0.0):
    dp = Trainer(MLP(rate, nnx.Rngs(0)), optax.adam(1e-2), loss_fn, strategy=strategy,
                 devices=devices)
    state = dp.init()
    for batch in batches:
        state, _ = dp.step(state, batch)
    canonical = dp.canonical(state)
    return [np.asarray(x) for x in jax.tree.leaves((canonical.params, canonical.rest))
            if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


@needs_devices(8)
@pytest.mark.parametrize("strategy", ["jit", "shard_map", "pmap"])
def test_a_model_with_batchnorm_equals_one_device_under_every_strategy(strategy):
    batches = _batches(5)
    want = _train("jit", 1, batches)
    got = _train(strategy, 8, batches)
    assert len(got) == len(want)
    for g, w in zip(got, want):  # parameters, and BatchNorm's running mean and variance
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@needs_devices(8)
def test_per_device_batch_statistics_are_an_opt_out_and_differ_from_the_global_ones():
    batches = _batches(3)
    per_device = _train(ShardMap(batch_stats="per_device"), 8, batches)
    same = _train(Pmap(batch_stats="per_device"), 8, batches)
    one = _train("jit", 1, batches)
    for a, b in zip(per_device, same):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(per_device, one))
    with pytest.raises(UsageError, match="Jit has no option 'batch_stats'"):
        Jit(batch_stats="per_device")


class Probe(nnx.Variable):
    """Not a parameter: the first example's dropout mask, averaged over replicas by the step."""


class DropoutProbe(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.scale = nnx.Param(np.ones((256,), np.float32))
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.seen = Probe(np.zeros((256,), np.float32))

    def __call__(self, x):
        kept = self.drop(np.ones((x.shape[0], 256), np.float32))
        self.seen[...] = kept[0]  # each replica's first example
        return (kept * self.scale).mean(-1) * x[:, 0]


@needs_devices(8)
@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "local_sgd"])
def test_dropout_masks_are_independent_across_replicas(strategy):
    value = LocalSGD(every=1000) if strategy == "local_sgd" else strategy  # no averaging
    dp = Trainer(DropoutProbe(nnx.Rngs(0, dropout=1)), optax.sgd(0.0),
                 lambda m, b: m(b).mean(), strategy=value, devices=8)
    state, _ = dp.step(dp.init(), np.ones((64, 1), np.float32))
    seen = np.asarray(dp.canonical(state).rest["seen"][...])
    # the mean over 8 replicas of a unit's keep/scale (0 or 2): only 0 or 2 if every replica
    # drew the same mask; independent masks give k/8 * 2 for k kept of 8
    kept_by = np.round(seen * 4).astype(int)  # k
    assert np.allclose(seen * 4, kept_by, atol=1e-5)
    assert ((kept_by > 0) & (kept_by < 8)).mean() > 0.9  # P(0 < k < 8) = 1 - 2/256
    assert abs(kept_by.mean() / 8 - 0.5) < 0.05  # still keeps half


def _probe_trainer():
    return Trainer(DropoutProbe(nnx.Rngs(0, dropout=1)), optax.sgd(0.1),
                   lambda m, b: m(b).mean(), strategy="shard_map", devices=8)


def _masks_and_leaves(trainer, state, steps):
    """Each step's dropout probe, and the final state's leaves (PRNG keys as key data)."""
    batch = np.ones((64, 1), np.float32)
    masks = []
    for _ in range(steps):
        state, _ = trainer.step(state, batch)
        masks.append(np.asarray(trainer.canonical(state).rest["seen"][...]))
    canonical = trainer.canonical(state)
    leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(canonical)]
    return masks, leaves, state


@needs_devices(8)
def test_replicas_keep_one_rng_state_so_a_resumed_run_draws_the_same_masks(tmp_path):
    """4 steps straight, against 2 steps, a checkpoint, a new trainer restored from it and 2
    more: the same dropout masks after the resume and a bitwise equal final state."""
    from jaxdist.io import Checkpointer

    straight = _probe_trainer()
    state = straight.init()
    keys = [x for x in jax.tree.leaves(state.rest)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert keys and all(k.sharding.is_fully_replicated for k in keys)
    want_masks, want_leaves, _ = _masks_and_leaves(straight, state, 4)

    first = _probe_trainer()
    _, _, stopped = _masks_and_leaves(first, first.init(), 2)
    saver = Checkpointer(tmp_path, every=1)
    saver.save(2, first.canonical(stopped))
    saver.close()
    resumed = _probe_trainer()
    reader = Checkpointer(tmp_path)
    restored, _ = reader.restore(2, resumed.canonical(resumed.init()))
    reader.close()
    masks, leaves, _ = _masks_and_leaves(resumed, resumed.place(restored), 2)

    assert not np.array_equal(want_masks[2], want_masks[0])  # the stream moves on each step
    for got, want in zip(masks, want_masks[2:]):
        np.testing.assert_array_equal(got, want)
    assert len(leaves) == len(want_leaves)
    for got, want in zip(leaves, want_leaves):
        np.testing.assert_array_equal(got, want)
