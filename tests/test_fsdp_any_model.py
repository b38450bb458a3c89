"""FSDP and ZeRO-1 need no annotations: a user's plain model is split by shape, trains as one
device does, and a strategy that would leave most bytes replicated says so."""

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from jaxdist.models import MnistCNN
from jaxdist import Trainer, make_mesh
from jaxdist.parallel.rules import ReplicationWarning


class PlainMLP(nnx.Module):
    """A user's model with no logical-axis annotations anywhere."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 256, use_bias=False, rngs=rngs)  # BatchNorm centres it
        self.norm = nnx.BatchNorm(256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 256, rngs=rngs)
        self.fc3 = nnx.Linear(256, 16, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm(self.fc1(x)))
        return self.fc3(jax.nn.relu(self.fc2(x)))


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batches(k=3, n=32):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(n, 64)).astype(np.float32), rng.integers(0, 16, n).astype(np.int32))
            for _ in range(k)]


def _bytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _bytes_on_one_device(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _trainer(strategy, mesh, model=PlainMLP):
    return Trainer(lambda: model(nnx.Rngs(0)), optax.adam(1e-3), loss_fn,
                   mesh=make_mesh(mesh, jax.devices()[:math.prod(
                       int(p.split("=")[1]) for p in mesh.split(",")) if mesh else 1]),
                   strategy=strategy)


@needs_devices(8)
def test_fsdp_on_an_unannotated_model_holds_an_eighth_of_the_parameter_bytes_per_device():
    trainer = _trainer("fsdp", "fsdp=8")
    state = trainer.init()
    assert _bytes_on_one_device(state.params) <= _bytes(state.params) / 8 * 1.05
    assert _bytes_on_one_device(state.opt_state) <= _bytes(state.opt_state) / 8 * 1.05
    kernel = state.params["fc2"]["kernel"][...]
    assert not kernel.sharding.is_fully_replicated


@needs_devices(8)
@pytest.mark.parametrize("strategy,mesh", [("fsdp", "fsdp=8"), ("fsdp", "data=2,fsdp=4"),
                                           ("zero1", "data=8")])
def test_an_unannotated_model_split_by_shape_trains_as_one_device_does(strategy, mesh):
    batches = _batches()

    def train(strategy, mesh):
        trainer = _trainer(strategy, mesh)
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.step(state, batch)
        return [np.asarray(x) for x in jax.tree.leaves((state.params, state.rest))]

    # atol: 1% of one Adam step (lr 1e-3). Adam divides by sqrt(v) + 1e-8, so a gradient element
    # near 1e-7 turns the ~1e-7 relative difference of another reduction order into ~2e-6 of
    # update (seen 1 element in 16384); a wrong split or a missing reduction is off by ~1e-3.
    for got, want in zip(train(strategy, mesh), train("dp", "")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_devices(8)
def test_zero1_on_an_unannotated_model_splits_the_optimizer_state_not_the_parameters():
    state = _trainer("zero1", "data=8").init()
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    assert _bytes_on_one_device(state.opt_state) <= _bytes(state.opt_state) / 8 * 1.05


@needs_devices(8)
def test_tensor_parallelism_on_a_model_without_annotations_warns_that_it_replicates():
    with pytest.warns(ReplicationWarning, match="strategy tp leaves 100% of the parameter bytes"):
        _trainer("tp", "data=4,tensor=2")


@needs_devices(8)
def test_fsdp_of_the_mnist_cnn_splits_what_divides_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplicationWarning)
        trainer = Trainer(lambda: MnistCNN(rngs=nnx.Rngs(0)), optax.adam(1e-3),
                          lambda m, b: m(b).mean(), mesh=make_mesh("fsdp=8"),
                          strategy="fsdp")
    state = trainer.init()
    fc1 = state.params["fc1"]["kernel"][...]
    assert fc1.sharding.shard_shape(fc1.shape) == (40, 50)  # 320 rows over 8 devices
    assert _bytes_on_one_device(state.params) < _bytes(state.params) / 2
