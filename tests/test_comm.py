"""Communication efficiency: reduced-precision and compressed gradient reductions, DiLoCo, staleness.

The reducers are checked inside `shard_map` on 8 replicas with known per-replica gradients; the
training-level options against plain data parallelism.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist import Jit, LocalSGD, ShardMap, Trainer, UsageError
from jaxdist.comm import (
    int8_reduce,
    mean_reduce,
    powersgd_reduce,
    stale_gradients,
    topk_reduce,
)
from jaxdist.comm.reducers import int8_error_bound
from jaxdist.models import MnistCNN
from jaxdist.parallel.mesh import DATA_AXIS, data_mesh
from tests.conftest import needs_devices

N = 8
pytestmark = needs_devices(N)


def _reduce_per_replica(reducer, grads, state=None, steps=1):
    """Runs `reducer` on 8 replicas: grads has a leading replica axis (or a list of such trees,
    one per step). Returns (outputs per step, with the replica axis; final state, stacked)."""
    mesh = data_mesh(jax.devices()[:N])
    steps_grads = grads if isinstance(grads, list) else [grads]
    if state is None:
        one = jax.tree.map(lambda x: x[0], steps_grads[0])
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (N, *x.shape)), reducer.init(one))

    def local(g, s):
        g, s = jax.tree.map(lambda x: x[0], (g, s))
        out, s = reducer.update(g, s)
        return jax.tree.map(lambda x: x[None], (out, s))

    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(DATA_AXIS), out_specs=P(DATA_AXIS),
                                check_vma=False))
    outs = []
    for g in steps_grads:
        out, state = run(g, state)
        outs.append(out)
    return outs, state


def _grads(rng, shapes=((5, 5, 1, 10), (10,), (320, 50))):
    return {f"w{i}": jnp.asarray(rng.normal(size=(N, *s)).astype(np.float32))
            for i, s in enumerate(shapes)}


def test_fp32_mean_reduce_is_the_exact_replica_mean(rng):
    grads = _grads(rng)
    [out], _ = _reduce_per_replica(mean_reduce(), grads)
    for k, g in grads.items():
        np.testing.assert_allclose(out[k], jnp.broadcast_to(g.mean(0), g.shape), rtol=1e-6,
                                   atol=1e-7)


def test_bf16_reduction_is_the_mean_to_bf16_precision_and_keeps_the_gradient_dtype(rng):
    grads = _grads(rng)
    [out], _ = _reduce_per_replica(mean_reduce(jnp.bfloat16), grads)
    for k, g in grads.items():
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(out[k][0], g.mean(0), atol=0.02)


def test_int8_all_reduce_error_is_within_its_bound_and_every_replica_agrees(rng):
    grads = _grads(rng)
    grads["w2"] = grads["w2"] * jnp.logspace(-3, 1, 50)  # columns of very different scales
    [out], _ = _reduce_per_replica(int8_reduce(block=64), grads)
    flat = jnp.concatenate([g.reshape(N, -1) for g in grads.values()], axis=1)
    got = jnp.concatenate([out[k].reshape(N, -1) for k in grads], axis=1)
    bound = int8_error_bound(flat, 64)
    error = jnp.abs(got[0] - flat.mean(0))
    assert bool(jnp.all(error <= bound * 1.0001 + 1e-7)), float(jnp.max(error - bound))
    assert float(error.max()) > 0  # it really is quantized
    np.testing.assert_array_equal(got, jnp.broadcast_to(got[0], got.shape))


def _conservation(reducer, rng, steps=5):
    """sum_t output_t + mean_i residual_i == sum_t mean_i g_t,i: compression delays, loses nothing."""
    grads = [_grads(rng, shapes=((25, 10), (40, 30))) for _ in range(steps)]
    outs, state = _reduce_per_replica(reducer, grads)
    residual = state.residual
    for k in grads[0]:
        applied = sum(o[k][0] for o in outs)
        kept = residual[k].mean(0).reshape(grads[0][k].shape[1:])
        exact = sum(g[k].mean(0) for g in grads)
        np.testing.assert_allclose(applied + kept, exact, rtol=1e-4, atol=1e-4)
    return outs, grads


def test_top_k_error_feedback_keeps_everything_it_did_not_send(rng):
    outs, grads = _conservation(topk_reduce(0.05), rng)
    sent = sum(int(jnp.count_nonzero(o[k][0])) for o in outs[:1] for k in o)
    total = sum(g[0].size for g in grads[0].values())
    assert sent <= N * max(1, int(0.05 * total))  # at most k entries per replica


def test_powersgd_error_feedback_keeps_everything_it_did_not_send(rng):
    _conservation(powersgd_reduce(rank=2), rng)


def test_powersgd_is_exact_when_the_mean_gradient_has_low_rank(rng):
    a, b = rng.normal(size=(2, 40, 2)).astype(np.float32)[0], rng.normal(size=(30, 2))
    coef = rng.normal(size=(N, 2)).astype(np.float32)
    per_replica = jnp.asarray(np.einsum("ir,nr,jr->nij", a, coef, b).astype(np.float32))
    [out], _ = _reduce_per_replica(powersgd_reduce(rank=4), {"w": per_replica})
    np.testing.assert_allclose(out["w"][0], per_replica.mean(0), rtol=1e-4, atol=1e-5)


def _batches(rng, steps=3, batch=64):
    return [(rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, batch).astype(np.int32)) for _ in range(steps)]


def _train(batches, tx=None, **kwargs):
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), tx or optax.sgd(0.05, momentum=0.9), loss_fn,
                 devices=N, **kwargs)
    state = dp.init()
    for batch in batches:
        state, metrics = dp.step(state, batch)
    return dp.canonical(state).params, metrics


def _assert_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_fp32_reduce_mode_equals_plain_data_parallelism(rng):
    batches = _batches(rng)
    plain, _ = _train(batches, strategy="shard_map")
    reduced, _ = _train(batches, strategy=ShardMap(reducer=mean_reduce()))
    _assert_close(plain, reduced, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_equals_the_whole_batch(rng):
    batches = _batches(rng)
    whole, _ = _train(batches, strategy="jit")
    accumulated, _ = _train(batches, strategy="jit", microbatches=4)
    _assert_close(whole, accumulated, rtol=1e-4, atol=1e-6)


def test_compression_composes_with_gradient_accumulation_and_learns(rng):
    batches = _batches(rng, steps=6) * 3
    _, first = _train(batches[:1], strategy=ShardMap(reducer=int8_reduce()), microbatches=2)
    _, last = _train(batches, strategy=ShardMap(reducer=int8_reduce()), microbatches=2)
    assert float(last["loss"]) < float(first["loss"])


def test_staleness_zero_equals_synchronous_training(rng):
    batches = _batches(rng)
    sync, _ = _train(batches, strategy="jit", tx=optax.sgd(0.05))
    stale0, _ = _train(batches, strategy="jit", tx=optax.chain(stale_gradients(0), optax.sgd(0.05)))
    _assert_close(sync, stale0, rtol=0, atol=0)


def test_stale_gradients_arrive_tau_steps_late():
    tx = stale_gradients(2)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    seen = []
    for t in range(5):
        out, state = tx.update({"w": jnp.full(3, float(t + 1))}, state, params)
        seen.append(float(out["w"][0]))
    assert seen == [0.0, 0.0, 1.0, 2.0, 3.0]


def test_diloco_with_outer_sgd_of_rate_one_is_plain_parameter_averaging(rng):
    batches = _batches(rng, steps=4)
    plain, _ = _train(batches, strategy=LocalSGD(every=2))
    outer, _ = _train(batches, strategy=LocalSGD(every=2, outer=optax.sgd(1.0)))
    _assert_close(plain, outer, rtol=1e-5, atol=1e-6)
    nesterov, _ = _train(batches, strategy=LocalSGD(
        every=2, outer=optax.sgd(0.7, momentum=0.9, nesterov=True)))
    assert not np.allclose(nesterov["fc1"]["kernel"][...], plain["fc1"]["kernel"][...])


def test_a_reducer_outside_shard_map_is_a_usage_error():
    with pytest.raises(UsageError, match="an option of ShardMap"):
        Jit(reducer=int8_reduce())
    with pytest.raises(UsageError, match="an option of LocalSGD"):
        ShardMap(outer=optax.sgd(0.7))


@pytest.mark.parametrize("flags, message", [
    (["--grad_reduce", "int8"], "shard_map"),
    (["--outer_optimizer", "nesterov"], "local_sgd"),
    (["--strategy", "shard_map", "--microbatches", "3"], "microbatches"),
    (["--model", "wide_cnn", "--compute_dtype", "bfloat16"], "CNN"),
])
def test_experiment_rejects_communication_flags_that_do_not_apply(flags, message, capsys):
    from experiments.mnist import main

    # compile_cache off: the in-process run must not turn the cache on for the tests after it
    assert main(["--config", "smoke", "--progress=false", "--compile_cache", "off", *flags]) == 2
    assert message in capsys.readouterr().err
