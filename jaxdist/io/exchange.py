"""Small agreements between the processes of one job, through the coordinator's key-value store.

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


def allgather(tag: str, value: Any, *, timeout_s: float = TIMEOUT_S) -> list[Any]:
    """Every process's `value` (anything JSON can hold), in process order; `[value]` alone.

    Raises:
        TransientError: a process did not publish within `timeout_s`, or the coordinator is gone.
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]  # the same types a peer's value would arrive as
    from jax._src import distributed

    client = distributed.global_state.client
    key = f"jaxdist/{tag}/{next(_rounds[tag])}"
    try:
        client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
        return [json.loads(client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
                for i in range(jax.process_count())]
    except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
        raise TransientError(f"the processes did not agree on {tag} within {timeout_s:.0f} s "
                             f"({first_line(e)})") from e
