"""The classic CNN, exactly: its layers, parameter count and output."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdist.models import MnistCNN


def test_cnn_has_the_classic_layers_and_21840_parameters():
    model = MnistCNN(rngs=nnx.Rngs(0))
    shapes = {k: v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes == {
        ("conv1", "kernel"): (5, 5, 1, 10),
        ("conv1", "bias"): (10,),
        ("conv2", "kernel"): (5, 5, 10, 20),
        ("conv2", "bias"): (20,),
        ("fc1", "kernel"): (320, 50),
        ("fc1", "bias"): (50,),
        ("fc2", "kernel"): (50, 10),
        ("fc2", "bias"): (10,),
    }
    assert sum(int(np.prod(s)) for s in shapes.values()) == 21840


def test_cnn_returns_log_probabilities():
    model = MnistCNN(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 28, 28, 1)), jnp.float32)
    log_probs = model(x)
    assert log_probs.shape == (3, 10)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
