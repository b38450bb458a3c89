"""The data-parallel strategies (the whole model on every device: jit, shard_map, pmap, local_sgd)
compute what one device computes on the same global batches, hold their declared layout and
evaluate exactly."""

import itertools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from jaxdist.models.classification import mnist_eval as eval_fn
from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist import STRATEGIES, LocalSGD, Trainer, UsageError
from jaxdist.data.pipeline import eval_batches, train_batches
from jaxdist.models import MnistCNN

STEPS = 4
GLOBAL_BATCH = 64
DATA_PARALLEL = [name for name, s in STRATEGIES.items() if s.parallelism == "data"]


@pytest.fixture(scope="module")
def mnist_batches(mnist):
    train, _ = mnist
    return list(itertools.islice(train_batches(train, GLOBAL_BATCH, seed=0), STEPS))


def _train(strategy, devices, batches, tx=None):
    model = MnistCNN(rngs=nnx.Rngs(0))
    dp = Trainer(model, tx or optax.sgd(0.05, momentum=0.9), loss_fn, strategy=strategy,
                 devices=devices)
    state = dp.init()
    losses = []
    for batch in batches:
        state, metrics = dp.step(state, batch)
        losses.append(float(np.mean(np.asarray(metrics["loss"]))))
    return dp, state, losses


def _params(dp, state):
    return jax.tree.map(np.asarray, jax.tree.leaves(dp.canonical(state).params))


@pytest.fixture(scope="module")
def one_device(mnist_batches):
    dp, state, losses = _train("jit", 1, mnist_batches)
    return _params(dp, state), losses


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("strategy", ["jit", "shard_map", "pmap"])
def test_backend_on_n_devices_equals_one_device(strategy, devices, mnist_batches, one_device):
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    dp, state, losses = _train(strategy, devices, mnist_batches)
    ref_params, ref_losses = one_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(_params(dp, state), ref_params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_local_sgd_with_h1_and_plain_sgd_equals_gradient_averaging(devices, mnist_batches):
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    sgd = optax.sgd(0.05)
    dp_avg, s_avg, _ = _train("jit", devices, mnist_batches, tx=sgd)
    dp_loc, s_loc, _ = _train(LocalSGD(every=1), devices, mnist_batches, tx=sgd)
    for got, want in zip(_params(dp_loc, s_loc), _params(dp_avg, s_avg)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_devices(4)
def test_local_sgd_with_h4_differs_from_gradient_averaging_and_still_trains(mnist):
    train, _ = mnist
    batches = list(itertools.islice(train_batches(train, 128, seed=0), 40))
    tx = optax.sgd(0.05, momentum=0.9)
    dp_avg, s_avg, _ = _train("jit", 4, batches, tx=tx)
    dp_loc, s_loc, losses = _train(LocalSGD(every=4), 4, batches, tx=tx)
    diff = max(np.max(np.abs(a - b)) for a, b in zip(_params(dp_loc, s_loc), _params(dp_avg, s_avg)))
    assert diff > 1e-4
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    # between averaging points the replicas really are apart, and equal right after
    stacked = jax.tree.leaves(s_loc.params)[0]
    assert s_loc.step.shape == (4,) and int(s_loc.step[0]) % 4 == 0
    np.testing.assert_array_equal(np.asarray(stacked[0]), np.asarray(stacked[3]))


@needs_devices(8)
@pytest.mark.parametrize("strategy", DATA_PARALLEL)
def test_evaluation_on_8_devices_equals_a_direct_pass_over_the_test_set(strategy, mnist):
    _, test = mnist
    model = MnistCNN(rngs=nnx.Rngs(0))
    dp = Trainer(model, optax.sgd(0.1), loss_fn, strategy=strategy, devices=8, eval_fn=eval_fn)
    sums = dp.evaluate(dp.init(), eval_batches(test, 800))  # 12 full batches + 400 padded rows
    direct = eval_fn(model, (test.images, test.labels, np.ones(len(test), np.float32)))
    assert sums["count"] == 10000
    assert sums["accuracy"] == float(direct["accuracy"])
    np.testing.assert_allclose(sums["loss"], float(direct["loss"]), rtol=1e-5)


@needs_devices(8)
@pytest.mark.parametrize("strategy", DATA_PARALLEL)
def test_the_declared_layout_holds_after_steps_and_the_step_is_traced_once(strategy, mnist_batches):
    traces = []

    def counting_loss(model, batch):  # Python runs only while the step is traced
        traces.append(1)
        return loss_fn(model, batch)

    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.05, momentum=0.9), counting_loss,
                 strategy=strategy, devices=8)
    state = dp.init()
    for batch in mnist_batches:
        state, _ = dp.step(state, batch)
    assert len(mnist_batches) == STEPS > 1 and len(traces) == 1
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == 8
    if strategy in ("jit", "shard_map"):
        assert leaf.sharding.is_fully_replicated
    else:  # one copy per replica along a leading axis
        assert leaf.shape[0] == 8 and not leaf.sharding.is_fully_replicated


def test_a_batch_that_does_not_divide_over_the_devices_is_a_usage_error(mnist_batches):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    model = MnistCNN(rngs=nnx.Rngs(0))
    dp = Trainer(model, optax.sgd(0.1), loss_fn, devices=8)
    images, labels = mnist_batches[0]
    with pytest.raises(UsageError, match="does not divide over 8"):
        dp.step(dp.init(), (images[:60], labels[:60]))


def test_asking_for_more_devices_than_exist_is_a_usage_error():
    with pytest.raises(UsageError, match="only"):
        Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn,
                devices=jax.device_count() + 1)


def test_an_unknown_strategy_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown strategy"):
        Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn, strategy="ddp", devices=1)


@needs_devices(8)
@pytest.mark.parametrize("strategy", ["shard_map", "pmap"])
def test_a_mapped_step_all_reduces_its_gradients_as_one_buffer_like_a_ddp_bucket(strategy):
    """One flat all-reduce per dtype, not one per array: across processes XLA:CPU runs each
    operand of an all-reduce as its own gloo all-reduce, which made a 2-process step 1.7x slower
    (docs/performance.md, #14-15)."""
    import re

    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.sgd(0.05), loss_fn, strategy=strategy)
    state = dp.init()
    rng = np.random.default_rng(0)
    batch = dp.shard_batch((rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
                            rng.integers(0, 10, 64).astype(np.int32)))
    hlo = dp.lower(state, batch).compile().as_text()
    reduces = [line for line in hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", line)]
    params = sum(x.size for x in jax.tree.leaves(dp.canonical(state).params))  # one replica's
    assert len(reduces) == 1, reduces
    shapes = re.findall(r"f32\[(\d*)\]", reduces[0].split("all-reduce")[0])
    assert len(shapes) == 1 and int(shapes[0]) > params, reduces[0][:300]
