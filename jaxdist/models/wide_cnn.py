"""The classic MNIST CNN made wide enough for model parallelism to matter, annotated for sharding."""

from __future__ import annotations

import jax
from flax import nnx

from jaxdist.models.layers import max_pool_2x2
from jaxdist.models.layers import axes


class WideCNN(nnx.Module):
    """conv 1->c1 5x5, pool, ReLU; conv c1->c2 5x5, pool, ReLU; 16*c2 -> hidden, ReLU; -> 10.

    The defaults (64, 128, 512) give 1.27M parameters; widths scale it. Returns log-probabilities.
    """

    def __init__(self, c1: int = 64, c2: int = 128, hidden: int = 512, *, rngs: nnx.Rngs):
        conv = lambda cin, cout: nnx.Conv(  # noqa: E731
            cin, cout, kernel_size=(5, 5), padding="VALID", rngs=rngs,
            kernel_metadata=axes(None, None, "conv_in", "conv_out"),
            bias_metadata=axes("conv_out"))
        self.conv1, self.conv2 = conv(1, c1), conv(c1, c2)
        self.fc1 = nnx.Linear(16 * c2, hidden, kernel_metadata=axes("features", "mlp"),
                              bias_metadata=axes("mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, kernel_metadata=axes("mlp", "classes"),
                              bias_metadata=axes("classes"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(max_pool_2x2(self.conv1(x)))
        x = nnx.relu(max_pool_2x2(self.conv2(x)))
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return nnx.log_softmax(self.fc2(x))
