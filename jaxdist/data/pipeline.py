"""Batches for data parallelism: the same global batches whatever the number of devices.

Training reads an endless stream of examples: epoch e is a permutation of the split seeded by
(seed, e), and epochs follow each other without a gap, so every example appears exactly once per
epoch and no example is dropped at an epoch's end (a batch may straddle two epochs). Global batch k
is stream positions [k*B, (k+1)*B); process p of P reads only its rows [k*B + p*B/P, ...), so the
global batch never depends on how many processes or devices share it.

A batch's indices are computed with numpy in one go: grain's per-element `shuffle` took 8.6 ms
per batch of 512 on this project's 2-core machine, about a tenth of a training step, on a core the
step needs (docs/performance.md). grain still does the loading: mapping, prefetching on a
background thread, resuming at a step by slicing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator

import numpy as np

from jaxdist.data.augment import Augment
from jaxdist.data.tfds_source import ArraySplit
from jaxdist.errors import UsageError

if TYPE_CHECKING:
    import grain


def _local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch < 1:
        raise UsageError(f"the global batch must be positive, got {global_batch}")
    if global_batch % process_count:
        raise UsageError(
            f"global batch {global_batch} does not divide over {process_count} processes"
        )
    return global_batch // process_count


# Above this many examples an epoch's order is computed per index (a keyed Feistel permutation,
# no memory) instead of held as an array (8 bytes per example).
MATERIALIZED_PERMUTATION_LIMIT = 1 << 24


class _EpochPermutations:
    """Stream position -> example index, vectorized; epoch e is a permutation seeded (seed, e)."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed

    @functools.lru_cache(maxsize=2)  # a batch touches at most two epochs
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int64)

    def _permute(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        if self.n <= MATERIALIZED_PERMUTATION_LIMIT:
            return self.permutation(epoch)[offsets]
        return feistel_permutation(offsets, self.n, (self.seed, epoch))

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            out[rows] = self._permute(int(epoch), offsets[rows])
        return out


def feistel_permutation(indices: np.ndarray, n: int, key: tuple[int, ...],
                        rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at `indices`, in O(1) memory: a balanced Feistel
    network on the smallest even-bit domain >= n, cycle-walking values that fall outside."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = np.random.default_rng(list(key)).integers(0, 1 << 62, rounds, dtype=np.uint64)
    x = np.asarray(indices, dtype=np.uint64)

    def encrypt(v):
        left, right = v >> np.uint64(half), v & mask
        for k in round_keys:
            mixed = (right * np.uint64(0x9E3779B97F4A7C15) + k) & np.uint64(2**64 - 1)
            mixed ^= mixed >> np.uint64(29)
            left, right = right, left ^ (mixed & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(x)
    outside = out >= np.uint64(n)
    while outside.any():  # cycle-walk: stays a bijection of [0, n)
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


_ENDLESS = 2**40  # batches (and examples) in the stream: unbounded in practice


def train_index_batches(
    num_examples: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Element k: the example indices of this process's rows of global batch k."""
    import grain  # here, not at import: jaxdist also runs where grain is not installed

    local = _local_batch_size(global_batch, process_count)
    if num_examples < 1:
        raise UsageError("the training split is empty")
    index_of = _EpochPermutations(num_examples, seed)
    rows = np.arange(local, dtype=np.int64) + process_index * local
    return grain.MapDataset.range(_ENDLESS).map(lambda k: index_of(k * global_batch + rows))


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
    import grain

    if augment is None:
        indices = train_index_batches(len(split), global_batch, seed, process_index,
                                      process_count)
        batches = indices[start_step:].map(lambda idx: (split.images[idx], split.labels[idx]))
    else:
        # per example: grain seeds each example's generator by its stream position
        local = _local_batch_size(global_batch, process_count)
        index_of = _EpochPermutations(len(split), seed)

        def load(position, rng):
            i = index_of(np.array([position]))[0]
            return augment(split.images[i], rng), split.labels[i]

        examples = grain.MapDataset.range(_ENDLESS).random_map(load, seed=seed)
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
