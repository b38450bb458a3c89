"""Every optimizer and schedule from config is a working optax transformation."""

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxdist import UsageError
from jaxdist.train import OptimizerConfig, make_optimizer, make_schedule
from jaxdist.train.optim import OPTIMIZERS, SCHEDULES


def _minimize(tx, steps=60):
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)
    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return float(loss(params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_minimizes_a_quadratic(name):
    cfg = OptimizerConfig(name=name, learning_rate=0.05, schedule="constant")
    assert _minimize(make_optimizer(cfg, 60)) < 13.0 * 0.5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_peaks_at_the_learning_rate_and_stays_positive(schedule):
    fn = make_schedule(OptimizerConfig(learning_rate=0.1, schedule=schedule), 100)
    values = [float(fn(i)) for i in range(100)]
    assert max(values) == pytest.approx(0.1, rel=1e-4)
    assert min(values) >= 0.0


def test_weight_decay_and_clipping_change_the_update():
    grads = {"w": jnp.array([100.0])}
    params = {"w": jnp.array([1.0])}

    def first_update(**kw):
        tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, schedule="constant", **kw), 1)
        return float(tx.update(grads, tx.init(params), params)[0]["w"][0])

    assert first_update() == pytest.approx(-100.0)
    assert first_update(clip_norm=1.0) == pytest.approx(-1.0)
    assert first_update(weight_decay=0.5) == pytest.approx(-100.5)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (OptimizerConfig(name="adagrad"), "unknown optimizer"),
        (OptimizerConfig(schedule="exp"), "unknown schedule"),
        (OptimizerConfig(learning_rate=0.0), "learning rate must be positive"),
    ],
)
def test_bad_optimizer_config_is_a_usage_error(cfg, message):
    with pytest.raises(UsageError, match=message):
        make_optimizer(cfg, 10)
