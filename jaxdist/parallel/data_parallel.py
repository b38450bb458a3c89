"""`DataParallel` and `ShardedTrainer`: the earlier names of `Trainer`, kept as thin aliases.

`DataParallel(model, tx, loss_fn, strategy="shard_map", devices=4)` is
`Trainer(model, tx, loss_fn, strategy="shard_map", devices=4)`; `ShardedTrainer(model_fn, tx,
loss_fn, mesh=mesh, strategy="fsdp")` is `Trainer(model_fn, ..., mesh=mesh, strategy="fsdp")`.
"""

from __future__ import annotations

from typing import Any, Callable

import optax
from flax import nnx
from jax.sharding import Mesh

from jaxdist.core.step import LossFn
from jaxdist.parallel.rules import Rules
from jaxdist.parallel.trainer import Trainer


class DataParallel(Trainer):
    """`Trainer` with the data-parallel defaults: strategy "jit" over `devices` (all)."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                 strategy: str = "jit", devices: Any = None, **options: Any):
        super().__init__(model, tx, loss_fn, strategy=strategy, devices=devices, **options)


class ShardedTrainer(Trainer):
    """`Trainer` with the model-parallel defaults: a model builder, strategy "fsdp"."""

    def __init__(self, model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                 loss_fn: LossFn, *, mesh: Mesh | str, strategy: str | Rules = "fsdp",
                 **options: Any):
        super().__init__(model_fn, tx, loss_fn, strategy=strategy, mesh=mesh, **options)
