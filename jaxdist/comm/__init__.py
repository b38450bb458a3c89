"""Communication efficiency: how gradients cross between replicas, and how often.

- `reducers`: gradient reductions run inside the `shard_map` step, each an optax-style
  (init, update) pair that performs its own collectives: an fp32/bf16 mean, an int8 quantized
  all-reduce, top-k sparsification and PowerSGD (both with error feedback).
- `stale_gradients`: an optax transformation applying gradients tau steps late, to measure what
  asynchrony costs in accuracy, deterministically.
- DiLoCo's outer optimizer lives with local SGD (`Trainer(strategy=LocalSGD(every=H,
  outer=...))`); the reducers go to `ShardMap(reducer=...)`.
"""

from jaxdist.comm.reducers import (
    REDUCERS,
    GradReducer,
    int8_reduce,
    make_reducer,
    mean_reduce,
    powersgd_reduce,
    topk_reduce,
)
from jaxdist.comm.stale import stale_gradients

__all__ = [
    "REDUCERS",
    "GradReducer",
    "int8_reduce",
    "make_reducer",
    "mean_reduce",
    "powersgd_reduce",
    "stale_gradients",
    "topk_reduce",
]
