"""Any dataset as global batches: numpy arrays, a TFDS dataset by name, or a grain source.

A `Dataset` reads examples by index from a random-access source (`len` and `[i]`), so nothing
needs to fit in host memory: a TFDS split is read record by record from its array_record files,
decoded and mapped on worker threads, `prefetch` batches ahead. Whatever the source, the contract
of `jaxdist.data.pipeline` holds: global batch k depends only on (seed, k), each process reads only
its rows of it, and any start step resumes exactly (epoch e is a permutation seeded (seed, e);
epochs follow each other without a gap).

    data = jaxdist.data.from_arrays((x, y), global_batch=256, seed=0)
    data = jaxdist.data.from_tfds("mnist", "train", global_batch=128, seed=0, map=normalize)
    for batch in data.batches(start_step=0): ...
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

from jaxdist.data.pipeline import _ENDLESS, _EpochPermutations, _local_batch_size
from jaxdist.errors import DataError, UsageError, first_line


class RandomAccess(Protocol):
    """What a source needs: grain's `RandomAccessDataSource` protocol."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass
class Dataset:
    """Global batches of a random-access source.

    Args:
        source: `len(source)` examples, `source[i]` one example (a pytree of arrays).
        global_batch: examples per step over all processes.
        seed: the order of the examples (epoch e is a permutation seeded (seed, e)).
        map: `example -> example`, per example on the worker threads (decode, normalize).
        name: how messages and checkpoints name the data.
        gather: `indices -> batch`, a vectorized read of many examples at once (arrays); used
            instead of per-example reads when `map` is None.
        augment: `(example, rng) -> example` for training batches, after `map`; `rng` is seeded
            by (seed, the example's position in the stream), so a resumed run, or one with
            another process count, augments exactly alike.
        workers: threads reading and mapping examples; `prefetch`: batches read ahead.
        process_index, process_count: this process's share (default: JAX's).
        unit, units_per_example: what throughput counts ("img/s" by default; `from_tokens`
            counts "tokens", seq_len of them per example).
        settings: more settings that define the data (augmentation, sequence length): part of
            `meta`, so a checkpoint refuses to resume with other values.
    """

    source: RandomAccess
    global_batch: int
    seed: int = 0
    map: Callable[[Any], Any] | None = None
    name: str = "data"
    gather: Callable[[np.ndarray], Any] | None = None
    workers: int = 4
    prefetch: int = 4
    process_index: int | None = None
    process_count: int | None = None
    describe_error: Callable[[int, Exception], str] | None = None
    augment: Callable[[Any, np.random.Generator], Any] | None = None
    unit: str = "img"
    units_per_example: int = 1
    settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.process_index is None:
            self.process_index = jax.process_index()
        if self.process_count is None:
            self.process_count = jax.process_count()
        self.local_batch = _local_batch_size(self.global_batch, self.process_count)
        if len(self.source) < 1:
            raise UsageError(f"{self.name} is empty")

    def __len__(self) -> int:
        return len(self.source)

    @property
    def steps_per_epoch(self) -> float:
        return len(self) / self.global_batch

    @property
    def meta(self) -> dict:
        """What a checkpoint's data position means: resuming with other values reads other data."""
        return {"data": self.name, "examples": len(self), "global_batch": self.global_batch,
                "seed": self.seed, **self.settings}

    def _read(self, index: int) -> Any:
        try:
            example = self.source[int(index)]
        except Exception as e:
            raise DataError(self._error(int(index), e)) from None
        return example if self.map is None else self.map(example)

    def _error(self, index: int, e: Exception) -> str:
        if self.describe_error is not None:
            return self.describe_error(index, e)
        return f"{self.name}: example {index} cannot be read ({first_line(e)})"

    def batches(self, start_step: int = 0) -> Iterator[Any]:
        """This process's rows of global batches `start_step`, `start_step + 1`, ... (endless)."""
        import grain  # here, not at import: jaxdist also runs where grain is not installed

        index_of = _EpochPermutations(len(self), self.seed)
        rows = np.arange(self.local_batch, dtype=np.int64) + self.process_index * self.local_batch
        positions = grain.MapDataset.range(_ENDLESS)[start_step:].map(
            lambda k: k * self.global_batch + rows)
        batches = positions.map(lambda p: self._augmented(self._gather(index_of(p)), p))
        options = grain.ReadOptions(num_threads=max(1, self.workers),
                                    prefetch_buffer_size=self.prefetch)
        return iter(batches.to_iter_dataset(options))

    def _gather(self, indices: np.ndarray) -> Any:
        if self.gather is not None and self.map is None:
            return self.gather(indices)
        return self._read_batch(indices)

    def _augmented(self, batch: Any, positions: np.ndarray) -> Any:
        if self.augment is None:
            return batch
        examples = [jax.tree.map(lambda x: x[i], batch) for i in range(len(positions))]
        out = [self.augment(ex, np.random.default_rng([self.seed, int(p)]))
               for ex, p in zip(examples, positions)]
        return jax.tree.map(lambda *xs: np.stack(xs), *out)

    def _read_batch(self, indices: np.ndarray) -> Any:
        examples = [self._read(i) for i in indices]
        return jax.tree.map(lambda *xs: np.stack(xs), *examples)

    def eval_batches(self, global_batch: int | None = None, *, limit: int | None = None
                     ) -> Iterator[tuple[Any, np.ndarray]]:
        """(batch, mask) over the examples in order, this process's rows; the last batch is
        padded with example 0 and its padding has mask 0."""
        global_batch = global_batch or self.global_batch
        local = _local_batch_size(global_batch, self.process_count)
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, global_batch):
            rows = np.arange(start + self.process_index * local,
                             start + (self.process_index + 1) * local)
            mask = rows < n
            yield self._gather(np.where(mask, rows, 0)), mask.astype(np.float32)


def from_arrays(arrays: Any, *, global_batch: int, seed: int = 0,
                map: Callable[[Any], Any] | None = None, name: str = "arrays",
                **kw) -> Dataset:
    """A pytree of arrays with one leading example dimension (e.g. `(x, y)` or a dict)."""
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        raise UsageError("from_arrays needs at least one array")
    lengths = {len(x) for x in leaves}
    if len(lengths) != 1:
        raise UsageError(f"from_arrays: the arrays have different lengths {sorted(lengths)}")

    class Rows:
        def __len__(self):
            return len(leaves[0])

        def __getitem__(self, i):
            return jax.tree.map(lambda x: x[i], arrays)

    return Dataset(Rows(), global_batch, seed, map=map, name=name,
                   gather=lambda idx: jax.tree.map(lambda x: x[idx], arrays), **kw)


def from_source(source: RandomAccess, *, global_batch: int, seed: int = 0,
                map: Callable[[Any], Any] | None = None, name: str | None = None,
                **kw) -> Dataset:
    """Any grain random-access source (`len` and `[i]`): array_record, parquet, your own."""
    return Dataset(source, global_batch, seed, map=map,
                   name=name or type(source).__name__, **kw)


def from_tfds(name: str, split: str, *, global_batch: int, seed: int = 0,
              map: Callable[[dict], Any] | None = None, data_dir: str | None = None,
              fallbacks: tuple = (), **kw) -> Dataset:
    """A prepared TFDS dataset by name, read with `tfds.data_source` (no TensorFlow), record by
    record: examples arrive decoded as dicts of numpy arrays, then go through `map`.

    Raises:
        UsageError: not prepared, no such split, or a damaged file (named in the message).
    """
    from jaxdist.data.tfds_source import open_builder, resolve_data_dir, split_files

    data_dir = resolve_data_dir(data_dir, name, fallbacks)
    builder = open_builder(name, data_dir, fallbacks=fallbacks)
    if split not in builder.info.splits:
        raise UsageError(f"{name} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise DataError(f"dataset {name}/{split} in {builder.data_dir} cannot be opened "
                        f"({first_line(e)}); prepare the dataset again") from None
    info = builder.info.splits[split]
    files = split_files(builder, split)
    ends = list(np.cumsum(info.shard_lengths))

    def describe(index: int, e: Exception) -> str:
        shard = min(bisect.bisect_right(ends, index), len(files) - 1)
        return (f"dataset {name}/{split}: {files[shard]} cannot be read ({first_line(e)}); "
                f"prepare the dataset again")

    return Dataset(source, global_batch, seed, map=map, name=f"{name}/{split}",
                   describe_error=describe, **kw)
