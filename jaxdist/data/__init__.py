"""Datasets through TFDS `data_source` and grain; per-process shares of global batches."""

from jaxdist.data.pipeline import eval_batches, train_batches, train_index_batches
from jaxdist.data.tfds_source import ArraySplit, load_split, resolve_data_dir

__all__ = [
    "ArraySplit",
    "eval_batches",
    "load_split",
    "resolve_data_dir",
    "train_batches",
    "train_index_batches",
]
