"""Datasets as global batches: numpy arrays, TFDS datasets by name, grain sources, text
as bytes; per-process
shares of global batches that depend only on (seed, step)."""

from jaxdist.data.pipeline import eval_batches, train_batches, train_index_batches
from jaxdist.data.sources import Dataset, RandomAccess, from_arrays, from_source, from_tfds
from jaxdist.data.tfds_source import ArraySplit, load_split, resolve_data_dir
from jaxdist.data.text import (TokenCorpus, from_tokens, is_validation, load_text, prepare_tokens,
                               stdlib_files, text_files)

__all__ = [
    "ArraySplit",
    "Dataset",
    "RandomAccess",
    "TokenCorpus",
    "eval_batches",
    "from_arrays",
    "from_source",
    "from_tfds",
    "from_tokens",
    "is_validation",
    "load_split",
    "load_text",
    "prepare_tokens",
    "resolve_data_dir",
    "stdlib_files",
    "text_files",
    "train_batches",
    "train_index_batches",
]
