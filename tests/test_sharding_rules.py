"""The rules strategies (dp, zero1, fsdp, tp, fsdp_tp, your own `Rules`): every one on every mesh
computes what one device computes, its declared layout holds, FSDP really splits the bytes, and
bad meshes/rules are clear errors."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import needs_devices
from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist import Rules, Trainer, UsageError, make_mesh
from jaxdist.io import Checkpointer
from jaxdist.models import ViT, WideCNN, vit_config
from jaxdist.parallel.mesh import parse_mesh_shape
from jaxdist.parallel.rules import ReplicationWarning

STEPS = 3
VIT = vit_config("tiny", embed=32, depth=2, heads=4, mlp=64, patch=7)
MODELS = {
    "vit": lambda: ViT(VIT, rngs=nnx.Rngs(0)),
    "wide_cnn": lambda: WideCNN(16, 32, 64, rngs=nnx.Rngs(0)),
}
MESHES = {  # the strategies each mesh shape exercises: every one on the 3-axis mesh
    "data=2,fsdp=2,tensor=2": ["dp", "zero1", "fsdp", "tp", "fsdp_tp"],
    "data=2,fsdp=4": ["fsdp"],
}
MORE_MESHES = {  # the rest of the cross product: the slow tier (CI runs both)
    "data=8": ["dp", "zero1"],
    "data=2,fsdp=4": ["zero1"],
    "fsdp=4,tensor=2": ["fsdp_tp", "tp"],
}


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (32, 28, 28, 1)).astype(np.float32),
             rng.integers(0, 10, 32).astype(np.int32)) for _ in range(STEPS)]


def _train(model, shape, strategy, batches, devices=8):
    trainer = Trainer(MODELS[model], optax.adam(1e-3), loss_fn,
                      mesh=make_mesh(shape, jax.devices()[:devices]), strategy=strategy)
    state = trainer.init()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    return trainer, state


_reference = {}


def _one_device(model, batches):
    if model not in _reference:
        _reference[model] = jax.tree.map(np.asarray, _train(model, "", "dp", batches, 1)[1].params)
    return _reference[model]


@needs_devices(8)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shape,strategy", [
    *((s, st) for s, sts in MESHES.items() for st in sts),
    *(pytest.param(s, st, marks=pytest.mark.slow) for s, sts in MORE_MESHES.items() for st in sts)])
def test_every_strategy_on_every_mesh_equals_one_device_after_k_steps(model, shape, strategy,
                                                                     batches):
    trainer, state = _train(model, shape, strategy, batches)
    want = _one_device(model, batches)
    for got, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=2e-6)
    # the declared layout holds after steps
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def _bytes_per_device(tree):
    return sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@needs_devices(8)
@pytest.mark.parametrize("model", MODELS)
def test_fsdp_over_8_devices_shards_at_least_98_percent_of_parameter_bytes(model):
    trainer = Trainer(MODELS[model], optax.adam(1e-3), loss_fn,
                      mesh=make_mesh("fsdp=8"), strategy="fsdp")
    state = trainer.init()
    sharded = sum(x.nbytes for x in jax.tree.leaves(state.params)
                  if not x.sharding.is_fully_replicated)
    assert sharded / _bytes(state.params) >= 0.98
    assert _bytes_per_device(state.params) <= _bytes(state.params) / 8 * 1.05
    assert _bytes_per_device(state.opt_state) <= _bytes(state.opt_state) / 8 * 1.05


@needs_devices(8)
def test_zero1_replicates_parameters_and_splits_the_optimizer_state():
    trainer = Trainer(MODELS["vit"], optax.adam(1e-3), loss_fn, mesh=make_mesh("data=8"),
                      strategy="zero1")
    state = trainer.init()
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    assert _bytes_per_device(state.opt_state) <= _bytes(state.opt_state) / 8 * 1.05


@needs_devices(8)
def test_the_step_is_traced_once_across_steps(batches):
    traces = []

    def counting_loss(model, batch):
        traces.append(1)
        return loss_fn(model, batch)

    trainer = Trainer(MODELS["vit"], optax.adam(1e-3), counting_loss,
                      mesh=make_mesh("data=2,fsdp=2,tensor=2"), strategy="fsdp_tp")
    state = trainer.init()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    assert len(traces) == 1


@needs_devices(8)
def test_a_checkpoint_saved_under_fsdp_on_8_restores_under_dp_on_4_and_1(tmp_path, batches):
    trainer = Trainer(MODELS["wide_cnn"], optax.adam(1e-3), loss_fn,
                      mesh=make_mesh("fsdp=8"), strategy="fsdp")
    state, _ = trainer.step(trainer.init(), batches[0])
    ckpt = Checkpointer(tmp_path, every=1)
    ckpt.save(1, state)
    ckpt.close()
    for n in (4, 1):
        dp = Trainer(MODELS["wide_cnn"](), optax.adam(1e-3), loss_fn, devices=n)
        restored, _ = Checkpointer(tmp_path).restore(1, dp.canonical(dp.init()))
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert jax.tree.leaves(restored.params)[0].sharding.is_fully_replicated


@pytest.mark.parametrize("text,message", [
    ("data=3,fsdp=2", "needs 6 devices, but 8 are in use"),
    ("data=2,model=4", "unknown mesh axis 'model'"),
    ("data:8", "write AXIS=SIZE"),
    ("data=8,data=1", "given twice"),
])
def test_a_bad_mesh_is_a_clear_error(text, message):
    with pytest.raises(UsageError, match=message):
        make_mesh(text, jax.devices()[:8])


@needs_devices(8)
def test_a_dimension_that_does_not_divide_over_the_tensor_axis_names_the_parameter():
    odd = lambda: ViT(vit_config("tiny", embed=36, heads=3, mlp=60, depth=1, patch=7),  # noqa: E731
                      rngs=nnx.Rngs(0))
    with pytest.raises(UsageError, match=r"parameter .* of shape .* does not divide over"):
        Trainer(odd, optax.adam(1e-3), loss_fn, mesh=make_mesh("tensor=8"), strategy="tp")


@needs_devices(8)
def test_fsdp_splits_the_next_named_dimension_when_one_does_not_divide():
    odd = lambda: ViT(vit_config("tiny", embed=36, heads=4, mlp=64, depth=1, patch=7),  # noqa: E731
                      rngs=nnx.Rngs(0))
    with pytest.warns(ReplicationWarning, match="leaves 64% of the parameter bytes"):
        trainer = Trainer(odd, optax.adam(1e-3), loss_fn, mesh=make_mesh("fsdp=8"),
                          strategy="fsdp")  # the odd embed dimensions stay whole: said so
    specs = {jax.tree_util.keystr(path): s.spec for path, s in
             jax.tree_util.tree_flatten_with_path(trainer.param_shardings)[0]}
    fc1 = next(spec for path, spec in specs.items() if "fc1" in path and "kernel" in path)
    assert tuple(fc1) == (None, "fsdp")  # embed 36 does not split 8 ways; mlp 64 does


def test_unknown_strategies_axes_and_logical_names_in_rules_are_clear_errors():
    mesh = make_mesh("", jax.devices()[:1])
    with pytest.raises(UsageError, match="unknown strategy 'zero3'"):
        Trainer(MODELS["vit"], optax.sgd(0.1), loss_fn, mesh=mesh, strategy="zero3")
    with pytest.raises(UsageError, match="rule 'embed' -> 'model': unknown mesh axis"):
        Rules(params={"embed": "model"})
    with pytest.raises(UsageError, match="unknown logical axis 'hidden'"):
        Rules(params={"hidden": "tensor"})
    assert parse_mesh_shape("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
