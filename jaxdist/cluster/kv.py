"""The coordinator's key-value store: the one handle on it, and small agreements through it.

The compilation cache agrees through it on whether every process holds a program, the watchdog
publishes each process's progress there, and `allgather` serves the checkpointer and the work-dir
lock.

No devices and no compiled program take part, so it works before and after a mesh exists and never
waits on a collective: each process publishes a JSON value under a key of its own and reads
everyone's. The checkpointer agrees on the step to restore this way, and the work-dir lock tells
every process whether process 0 got it.

    >>> views = allgather("newest-step", 40)   # [40, 30] with 2 processes: each one's value
    >>> agreed = min(views)

Every process must make the same calls in the same order (the keys are numbered per tag).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import jax

from jaxdist.errors import TransientError, first_line

TIMEOUT_S = 1800  # a peer still reading a large checkpoint is slow, not lost
_rounds: defaultdict[str, itertools.count] = defaultdict(itertools.count)


def client() -> Any:
    """The joined job's coordination-service client (its key-value store); None before
    `jax.distributed.initialize` or without it."""
    from jax._src import distributed  # private: JAX gives the client no public handle

    return distributed.global_state.client


def allgather(tag: str, value: Any, *, timeout_s: float = TIMEOUT_S) -> list[Any]:
    """Every process's `value` (anything JSON can hold), in process order; `[value]` alone.

    Raises:
        TransientError: a process did not publish within `timeout_s`, or the coordinator is gone.
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]  # the same types a peer's value would arrive as
    store = client()
    key = f"jaxdist/{tag}/{next(_rounds[tag])}"
    try:
        store.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
        return [json.loads(store.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
                for i in range(jax.process_count())]
    except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
        raise TransientError(f"the processes did not agree on {tag} within {timeout_s:.0f} s "
                             f"({first_line(e)})") from e
