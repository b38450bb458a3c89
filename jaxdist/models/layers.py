"""Layers written for speed on XLA's CPU backend, numerically equal to the textbook ones, and the
metadata that names a parameter's dimensions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import variablelib

# flax 0.12.12 names a variable's logical axes `out_sharding` (and warns on `sharding_names`);
# older releases, such as the GPU machine's, know only `sharding_names`
_AXES_KEY = ("out_sharding" if hasattr(variablelib, "_remap_sharding_metadata")
             else "sharding_names")


def axes(*names: str | None) -> dict:
    """Variable metadata naming a parameter's dimensions with logical axes
    (`jaxdist.parallel.rules`); no mesh is needed to build the model."""
    return {_AXES_KEY: names, "eager_sharding": False}


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...],
          std: float | None) -> nnx.Param:
    """A parameter named with logical axes: normal of `std` (drawn from `rngs.params()`), or ones
    where `std` is None (a norm's scale)."""
    value = jnp.ones(shape) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, **axes(*names))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (NHWC), as a reshape and a max.

    Equal to `nnx.max_pool(x, (2, 2), strides=(2, 2))` in the forward pass, but its gradient is an
    elementwise mask instead of XLA's select-and-scatter, which is ~10x slower on CPU: the classic
    CNN's training step at batch 512 went from 171 ms to 97 ms on one CPU device (see
    docs/performance.md). On exact ties the gradient is split between the tied inputs rather than
    given to the first one.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got {h}x{w}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

