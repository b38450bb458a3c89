"""The classic MNIST CNN (the PyTorch examples' `Net` without dropout), in Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdist.models.layers import max_pool_2x2


class MnistCNN(nnx.Module):
    """conv 1->10 5x5, max-pool 2, ReLU; conv 10->20 5x5, max-pool 2, ReLU; 320->50, ReLU; 50->10.

    Takes NHWC float images of shape (batch, 28, 28, 1) and returns log-probabilities.

    Example:
        >>> model = MnistCNN(rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype=None):
        # dtype: the computation's (e.g. bfloat16); parameters stay float32 (master weights)
        self.conv1 = nnx.Conv(1, 10, kernel_size=(5, 5), padding="VALID", dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(10, 20, kernel_size=(5, 5), padding="VALID", dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(320, 50, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(50, 10, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(max_pool_2x2(self.conv1(x)))
        x = nnx.relu(max_pool_2x2(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return nnx.log_softmax(self.fc2(x).astype(jnp.float32))
