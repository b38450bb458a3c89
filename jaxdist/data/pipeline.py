"""Batches for data parallelism: the same global batches whatever the number of devices.

Training reads an endless stream of examples: epoch e is a grain permutation of the split seeded by
(seed + e), and epochs follow each other without a gap, so every example appears exactly once per
epoch and no example is dropped at an epoch's end (a batch may straddle two epochs). Global batch k
is stream positions [k*B, (k+1)*B); process p of P reads only its rows [k*B + p*B/P, ...), so the
global batch never depends on how many processes or devices share it.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from jaxdist.data.augment import Augment
from jaxdist.data.tfds_source import ArraySplit
from jaxdist.errors import UsageError


def _local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch < 1:
        raise UsageError(f"the global batch must be positive, got {global_batch}")
    if global_batch % process_count:
        raise UsageError(
            f"global batch {global_batch} does not divide over {process_count} processes"
        )
    return global_batch // process_count


def train_index_batches(
    num_examples: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Element k: the example indices of this process's rows of global batch k."""
    local = _local_batch_size(global_batch, process_count)
    stream = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
    return stream.batch(local)[process_index::process_count]


def train_batches(
    split: ArraySplit,
    global_batch: int,
    seed: int,
    *,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 4,
    augment: Augment | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of this process's share of global batches start_step, start_step+1, ...

    Batches are gathered from the decoded arrays on a background thread, `prefetch` ahead.
    `augment(image, rng)` (see `jaxdist.data.augment`) transforms each training example.
    """
    if augment is None:
        indices = train_index_batches(len(split), global_batch, seed, process_index,
                                      process_count)
        batches = indices[start_step:].map(lambda idx: (split.images[idx], split.labels[idx]))
    else:
        local = _local_batch_size(global_batch, process_count)
        stream = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat()
        examples = stream.random_map(
            lambda i, rng: (augment(split.images[i], rng), split.labels[i]), seed=seed)
        batches = examples.batch(local)[process_index::process_count][start_step:]
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    return iter(batches.to_iter_dataset(options))


def eval_batches(
    split: ArraySplit,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) in order; the last batch is padded and its padding has mask 0."""
    local = _local_batch_size(global_batch, process_count)
    n = len(split) if limit is None else min(limit, len(split))
    for start in range(0, n, global_batch):
        rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = rows < n
        rows = np.where(mask, rows, 0)
        yield split.images[rows], split.labels[rows], mask.astype(np.float32)
