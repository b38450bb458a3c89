"""Optimizers from config: every choice is an optax composition, nothing hand-written."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import optax

from jaxdist.errors import UsageError



Optimizer = Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"]
LrSchedule = Literal["constant", "cosine", "warmup_cosine", "onecycle", "step"]
OPTIMIZERS, SCHEDULES = get_args(Optimizer), get_args(LrSchedule)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What `make_optimizer` builds. Step counts are derived from epochs by the caller."""

    name: Optimizer = "adam"
    """optax optimizer"""
    learning_rate: float = 3e-3
    """peak learning rate"""
    schedule: LrSchedule = "onecycle"
    """learning-rate schedule (warmup_cosine and onecycle warm up over --warmup_fraction)"""
    warmup_fraction: float = 0.2
    """fraction of training spent warming up (warmup_cosine, onecycle)"""
    momentum: float = 0.9
    """momentum of momentum, nesterov and rmsprop"""
    weight_decay: float = 0.0
    """decoupled (AdamW-style) for adam/adamw, added to the gradient (L2) otherwise"""
    clip_norm: float = 0.0
    """clip the global gradient norm to this value (0: no clipping)"""
    b1: float = 0.9
    """Adam's first-moment decay"""
    b2: float = 0.999
    """Adam's (and RMSProp's) second-moment decay"""
    eps: float = 1e-8
    """Adam's and RMSProp's epsilon"""
    step_decay: float = 0.1
    """schedule step: multiply the rate by this at each of --step_boundaries"""
    step_boundaries: tuple[float, ...] = (0.5, 0.75)
    """schedule step: where the rate drops, as fractions of training"""


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule over `total_steps` optimizer steps."""
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 < cfg.learning_rate < math.inf:  # also NaN: it would train NaN steps, then stop
        raise UsageError(f"the learning rate must be positive and finite, got {cfg.learning_rate}")
    total_steps = max(int(total_steps), 1)
    warmup = max(int(cfg.warmup_fraction * total_steps), 1)
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr, pct_start=warmup / total_steps)
    boundaries = {int(f * total_steps): cfg.step_decay for f in cfg.step_boundaries}
    return optax.piecewise_constant_schedule(lr, boundaries)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """An optax optimizer: optional clipping, then the update rule with its schedule."""
    if cfg.name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = make_schedule(cfg, total_steps)
    decoupled = cfg.name in ("adam", "adamw")
    if cfg.name in ("adam", "adamw"):
        rule = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        rule = optax.sgd(lr)
    elif cfg.name in ("momentum", "nesterov"):
        rule = optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.name == "nesterov")
    else:
        rule = optax.rmsprop(lr, momentum=cfg.momentum, eps=cfg.eps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.weight_decay > 0 and not decoupled:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(rule)
    return optax.chain(*parts) if len(parts) > 1 else rule
