"""Datasets as global batches: numpy arrays, TFDS datasets by name, grain sources, text as
bytes; each process reads its share of global batches that depend only on (seed, step)."""

from jaxdist.data.sources import Dataset, RandomAccess, from_arrays, from_source, from_tfds
from jaxdist.data.tfds_source import ArraySplit, load_split
from jaxdist.data.text import TokenCorpus, from_tokens, load_text

__all__ = [
    "ArraySplit",
    "Dataset",
    "RandomAccess",
    "TokenCorpus",
    "from_arrays",
    "from_source",
    "from_tfds",
    "from_tokens",
    "load_split",
    "load_text",
]
