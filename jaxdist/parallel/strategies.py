"""The one strategy table: every way jaxdist lays out a train step, and what each one accepts.

Two layouts implement them:
- "rules": one `jax.jit` program over a named mesh; parameters, gradients and optimizer state
  laid out by sharding rules (`jaxdist.parallel.rules`). `jit` is data parallelism in this layout
  (the same as `dp`: replicated state, the batch split over `data`).
- "mapped": each device runs the step on its shard inside `jax.shard_map` / `jax.pmap`, with the
  collectives written out (`jaxdist.parallel.backends`): what gradient compression, per-device
  batch statistics and local SGD need.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A row of the table.

    Attributes:
        name: what `strategy=` takes.
        layout: "rules" or "mapped" (see the module docstring).
        summary: one line for help texts and the README.
        default_axis: the mesh axis all devices go on when no mesh is given ("data=N",
            "fsdp=N"); tp pairs devices on "tensor".
        grad_reducer, local_steps, per_device_batch_stats: options only it accepts.
    """

    name: str
    layout: str
    summary: str
    default_axis: str = "data"
    grad_reducer: bool = False
    local_steps: bool = False
    per_device_batch_stats: bool = False


STRATEGIES_TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("jit", "rules", "jax.jit over a data mesh: XLA inserts the gradient all-reduce"),
    Strategy("shard_map", "mapped", "jax.shard_map: each device's gradients lax.pmean-ed",
             grad_reducer=True, per_device_batch_stats=True),
    Strategy("pmap", "mapped", "jax.pmap + lax.pmean, the classic per-device program",
             per_device_batch_stats=True),
    Strategy("local_sgd", "mapped", "each replica steps alone; parameters averaged every H steps",
             local_steps=True),
    Strategy("dp", "rules", "replicated parameters and optimizer state, batch over data/fsdp"),
    Strategy("zero1", "rules", "ZeRO-1: optimizer state split over data/fsdp"),
    Strategy("fsdp", "rules", "FSDP (ZeRO-3): parameters, gradients, optimizer state split",
             default_axis="fsdp"),
    Strategy("tp", "rules", "Megatron tensor parallelism of the MLP and attention",
             default_axis="tensor"),
    Strategy("sp", "rules", "sequence parallelism: tp, and activations between attention and MLP "
             "split along seq", default_axis="tensor"),
    Strategy("fsdp_tp", "rules", "FSDP and tensor parallelism together", default_axis="tensor"),
)}
STRATEGY_NAMES = tuple(STRATEGIES_TABLE)
DATA_PARALLEL_STRATEGIES = ("jit", "shard_map", "pmap", "local_sgd")


def default_mesh(strategy: str, devices: int) -> str:
    """All devices on the strategy's own axis; tensor parallelism takes pairs (tensor=2)."""
    row = STRATEGIES_TABLE.get(strategy)
    axis = row.default_axis if row is not None else "data"
    if axis == "tensor":
        tensor = 2 if devices % 2 == 0 and devices > 1 else 1
        outer = "fsdp" if strategy == "fsdp_tp" else "data"
        return f"{outer}={devices // tensor},tensor={tensor}"
    return f"{axis}={devices}"
