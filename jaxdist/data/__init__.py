"""Datasets as global batches: numpy arrays, TFDS datasets by name, grain sources; per-process
shares of global batches that depend only on (seed, step)."""

from jaxdist.data.pipeline import eval_batches, train_batches, train_index_batches
from jaxdist.data.sources import Dataset, RandomAccess, from_arrays, from_source, from_tfds
from jaxdist.data.tfds_source import ArraySplit, load_split, resolve_data_dir

__all__ = [
    "ArraySplit",
    "Dataset",
    "RandomAccess",
    "eval_batches",
    "from_arrays",
    "from_source",
    "from_tfds",
    "load_split",
    "resolve_data_dir",
    "train_batches",
    "train_index_batches",
]
