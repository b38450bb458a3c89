"""A small task of the tests' own, a user's as much as jaxdist sees: an MLP with BatchNorm and
Dropout on synthetic numpy arrays (4 classes separable by a fixed linear map)."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

import jaxdist

# a run that prints nothing and watches for no hang: what most tests of fit want
QUIET = jaxdist.ObserveConfig(progress=False, hang_timeout=0)

FEATURES, CLASSES = 16, 4


class MLP(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear; nothing jaxdist-specific."""

    def __init__(self, rngs: nnx.Rngs, rate: float = 0.1, hidden: int = 64):
        self.fc1 = nnx.Linear(FEATURES, hidden, use_bias=False, rngs=rngs)  # BatchNorm centres it
        self.norm = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(jax.nn.relu(self.norm(self.fc1(x)))))


def arrays(n: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=(FEATURES, CLASSES)).astype(np.float32)
    return x, (x @ w).argmax(-1).astype(np.int32)


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": (logits.argmax(-1) == y).mean()}


def eval_fn(model, batch):
    """Sums over the batch, padding masked out."""
    x, y, mask = batch
    model.eval()
    logits = model(x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"count": mask.sum(), "accuracy": ((logits.argmax(-1) == y) * mask).sum(),
            "loss": (nll * mask).sum()}


def leaves(tree) -> list[np.ndarray]:
    """Host copies of every array (PRNG keys as their key data)."""
    from jaxdist.parallel.backends import to_host

    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return to_host(x)

    return [host(x) for x in jax.tree.leaves(tree)]
