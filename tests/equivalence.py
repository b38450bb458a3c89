"""Training the same steps under a strategy and on one device: what the "every strategy equals one
device" specifications of the language models compare."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import numpy as np
import optax
from flax import nnx

from jaxdist import Pipeline, Trainer


def mesh_devices(mesh: str) -> int:
    """Devices of a mesh string ("data=2,fsdp=4" -> 8); 1 for none."""
    return math.prod(int(part.split("=")[1]) for part in mesh.split(",")) if mesh else 1


def packed_document_batches(vocab: int, *, steps: int, batch: int, seq: int,
                            cuts: tuple[int, int]) -> list[tuple[np.ndarray, ...]]:
    """`steps` batches of (inputs, targets, segment ids) of random tokens, each row packed with
    documents of random lengths: `rng.integers(*cuts)` document boundaries per row (segment ids
    1-based and contiguous)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (steps, batch, seq + 1), dtype=np.int32)

    def segments(rows: int) -> np.ndarray:
        out = np.zeros((rows, seq), np.int32)
        for row in out:
            at = np.sort(rng.choice(np.arange(1, seq), rng.integers(*cuts), replace=False))
            row[:] = np.searchsorted(at, np.arange(seq), side="right") + 1
        return out

    return [(t[:, :-1], t[:, 1:], segments(batch)) for t in tokens]


def train_steps(model_fn: Callable[[], Any], loss_fn: Callable, batches: Iterable, *,
                strategy: Any = "dp", mesh: str = "", eval_fn: Callable | None = None
                ) -> tuple[np.ndarray, Any]:
    """(losses, final parameters on the host) after one plain-SGD step per batch. SGD: an exact
    comparison, without Adam's division amplifying float rounding."""
    trainer = Trainer(model_fn, optax.sgd(0.5), loss_fn, strategy=strategy, mesh=mesh or None,
                      devices=mesh_devices(mesh), eval_fn=eval_fn)
    state = trainer.init()
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, trainer.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    params = nnx.state(trainer.sync_model(state), nnx.Param)
    return np.asarray(losses), jax.tree.map(np.asarray, params)


def assert_same_training(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two `train_steps` results agree: every loss and every parameter."""
    (got_losses, got_params), (want_losses, want_params) = got, want
    np.testing.assert_allclose(got_losses, want_losses, rtol=rtol)
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def case_id(strategy: Any, mesh: str) -> str:
    """A readable pytest id of a (strategy, mesh) case."""
    if isinstance(strategy, Pipeline):
        strategy = f"{strategy.name}-{strategy.schedule}-M{strategy.microbatches or 'default'}"
    return f"{strategy}-{mesh}"
