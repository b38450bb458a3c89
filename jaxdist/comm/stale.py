"""Asynchronous training, made deterministic: gradients applied tau steps after they were taken."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdist.errors import UsageError


class StaleState(NamedTuple):
    queue: Any  # per leaf: (tau, *shape), the oldest gradient first


def stale_gradients(tau: int) -> optax.GradientTransformation:
    """Delays every gradient by `tau` steps, as an asynchronous parameter server with a fixed
    staleness would; chain it before the optimizer: `optax.chain(stale_gradients(2), adam)`.

    The first `tau` steps apply zero gradients (nothing has arrived yet). tau = 0 is the identity,
    so it equals synchronous training exactly. Unlike real asynchrony, the delay is the same on
    every run, so its effect on accuracy can be measured and compared.
    """
    if tau < 0:
        raise UsageError(f"the staleness tau must be >= 0, got {tau}")
    if tau == 0:
        return optax.identity()

    def init(params):
        return StaleState(jax.tree.map(lambda p: jnp.zeros((tau, *p.shape), p.dtype), params))

    def update(updates, state, params=None):
        del params
        oldest = jax.tree.map(lambda q: q[0], state.queue)
        queue = jax.tree.map(lambda q, g: jnp.concatenate([q[1:], g[None].astype(q.dtype)]),
                             state.queue, updates)
        return oldest, StaleState(queue)

    return optax.GradientTransformation(init, update)
