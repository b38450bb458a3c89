"""How jaxdist sets up XLA's CPU backend: oneDNN convolutions, on by default, same results."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdist.models.classification import mnist_loss as loss_fn
from jaxdist import Trainer
from jaxdist.cluster import devices
from jaxdist.cluster.devices import XLA_OWN_CPU_KERNELS
from jaxdist.models import MnistCNN
from jaxdist.observe.flops import flops_per_step

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="oneDNN is XLA:CPU's")


@pytest.fixture
def fresh_env(monkeypatch):
    """XLA_FLAGS and the opt-out unset, and JAX's backends reported as not started yet."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAXDIST_CPU_ONEDNN", raising=False)
    monkeypatch.setattr(devices, "_backends_started", lambda: False)
    return monkeypatch


def test_onednn_flags_are_added_to_xla_flags_before_the_backend_starts(fresh_env):
    fresh_env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert devices.use_onednn_convolutions()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=4"
    assert set(devices.ONEDNN_XLA_FLAGS) <= set(flags)
    assert devices.ONEDNN_ALL_CONVOLUTIONS_FLAG in flags  # gradients too, not YNNPACK's
    assert devices.use_onednn_convolutions()  # a second call adds nothing
    assert len(os.environ["XLA_FLAGS"].split()) == len(flags)


@pytest.mark.parametrize("setting, flags, expected", [
    ("0", "", False),                                                  # opted out
    ("1", "--xla_cpu_experimental_onednn_custom_call=false", False),   # the user's own flag wins
    ("1", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true", True),
])
def test_the_user_decides_over_onednn(fresh_env, setting, flags, expected):
    fresh_env.setenv("JAXDIST_CPU_ONEDNN", setting)
    fresh_env.setenv("XLA_FLAGS", flags)
    assert devices.use_onednn_convolutions() is expected
    assert os.environ["XLA_FLAGS"] == flags


def test_after_the_backend_started_the_flags_are_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(devices, "_backends_started", lambda: True)
    assert not devices.use_onednn_convolutions()
    assert os.environ["XLA_FLAGS"] == ""


def _cnn_trainer_and_batch():
    dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(3e-3), loss_fn, strategy="jit",
                 devices=2)
    rng = np.random.default_rng(0)
    batch = dp.shard_batch((rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
                            rng.integers(0, 10, 64).astype(np.int32)))
    return dp, batch


@on_cpu
def test_cnn_training_with_onednn_convolutions_equals_eigen_to_float32_rounding():
    """The test session runs with the defaults (conftest calls configure_cpu_devices): the same
    train step compiled with oneDNN convolutions and with XLA's own, 5 Adam steps on 2 devices."""
    dp, batch = _cnn_trainer_and_batch()
    batches = [batch] * 5  # one batch again and again: the loss must fall
    lowered = dp.backend.step.lower(dp.init(), batches[0])
    runs = {}
    for name, options in (("onednn", {}), ("eigen", XLA_OWN_CPU_KERNELS)):
        compiled = lowered.compile(compiler_options=options)
        targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
        runs[name] = (targets, *_train(compiled, dp.init(), batches))
    (onednn_calls, onednn_params, onednn_losses), (eigen_calls, eigen_params, eigen_losses) = (
        runs["onednn"], runs["eigen"])
    # conv1 and conv2 forward, conv2's input gradient, both weight gradients
    assert onednn_calls.count("__onednn$convolution") == 5
    assert "__onednn$convolution" not in eigen_calls
    np.testing.assert_allclose(onednn_losses, eigen_losses, rtol=1e-5)
    assert onednn_losses[-1] < onednn_losses[0]
    for a, b in zip(jax.tree.leaves(onednn_params), jax.tree.leaves(eigen_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@on_cpu
def test_gradient_accumulation_keeps_every_convolution_on_onednn_in_a_quarter_of_the_memory():
    """4 microbatches of the CNN: 4 x 5 oneDNN convolutions and no loop-nest one (in a loop body
    XLA:CPU compiled conv2's input gradient as one: 80x slower), activations of one microbatch."""
    def compiled_step(microbatches):
        dp = Trainer(MnistCNN(rngs=nnx.Rngs(0)), optax.adam(3e-3), loss_fn, devices=1,
                     microbatches=microbatches)
        batch = dp.shard_batch((np.zeros((512, 28, 28, 1), np.uint8), np.zeros(512, np.int32)))
        return dp.lower(dp.init(), batch).compile()

    whole, accumulated = compiled_step(1), compiled_step(4)
    text = accumulated.as_text()
    assert text.count('custom_call_target="__onednn$convolution"') == 4 * 5
    assert " convolution(" not in text
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(accumulated) < 0.35 * temp(whole)


@on_cpu
def test_flops_count_what_onednn_computes():
    """XLA's cost analysis sees no FLOPs inside a oneDNN call; MFU must not drop because of it."""
    dp, batch = _cnn_trainer_and_batch()
    lowered = dp.backend.step.lower(dp.init(), batch)
    with_onednn = lowered.compile()
    own_kernels = lowered.compile(compiler_options=XLA_OWN_CPU_KERNELS)
    assert "__onednn$" in with_onednn.as_text()
    assert flops_per_step(with_onednn) < flops_per_step(own_kernels)  # what XLA alone reports
    assert flops_per_step(with_onednn, lowered) == flops_per_step(own_kernels)


def _train(compiled, state, batches):
    losses = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses
