"""Image-classification splits from TFDS, decoded once and kept as arrays.

`tfds.data_source` reads the prepared array_record files without TensorFlow, but decoding MNIST's
60,000 PNGs takes ~12-17 s on two cores. Training reads every image many times, so each split is
decoded once into uint8 arrays and cached as an uncompressed .npz keyed by the dataset files'
identity; later runs (and other processes of the same job) load it in well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxdist.errors import DataError, UsageError, first_line
from jaxdist.progress import Progress

_DECODE_CHUNK = 2000


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """A decoded split: `images` (N, H, W, C) uint8 and `labels` (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(data_dir: str | None, name: str | None = None,
                     fallbacks: tuple[str | os.PathLike, ...] = ()) -> str | None:
    """The flag wins, then $TFDS_DATA_DIR, then TFDS's own default (None); when `name` is not
    prepared in the default, the first of `fallbacks` that holds it (a project's shared copy)."""
    explicit = data_dir or os.environ.get("TFDS_DATA_DIR")
    if explicit or not name or not fallbacks:
        return explicit or None
    if _is_prepared(name, None):
        return None
    for candidate in fallbacks:
        if Path(candidate).is_dir() and _is_prepared(name, str(candidate)):
            return str(candidate)
    return None


def _is_prepared(name: str, data_dir: str | None) -> bool:
    """Whether TFDS finds `name` prepared in `data_dir`, without its warnings about where not."""
    import tensorflow_datasets as tfds
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # damaged metadata: not usable here (open_builder says why if chosen)
        return False
    finally:
        logging.set_verbosity(level)


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXDIST_CACHE_DIR", Path.home() / ".cache" / "jaxdist"))


def open_builder(name: str, data_dir: str | None, download: bool = False, fallbacks=()):
    """The TFDS builder of a prepared dataset (preparing it with `download`).

    Raises:
        UsageError: not prepared (saying how to get it); DataError: its metadata is damaged.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # a garbled dataset_info.json / features.json: protobuf, JSON errors
        root = Path(data_dir) if data_dir else Path.home() / "tensorflow_datasets"
        damaged = sorted(str(p) for p in root.glob(f"{name}/*/*.json")) or [str(root / name)]
        raise DataError(f"dataset {name!r}: its metadata cannot be read ({first_line(e)}); check "
                        f"or prepare again: {', '.join(damaged)}") from None
    if builder.is_prepared():
        return builder
    where = builder.data_dir
    also = "".join(f" (nor in {f})" for f in fallbacks if str(f) != str(data_dir))
    ways = (f"point --data_dir (or TFDS_DATA_DIR) at a TFDS data dir that holds "
            f"{name}/{builder.info.version}, or pass --download to fetch and prepare it (needs "
            f"internet and the prepare extra: `pip install 'jaxdist[prepare]'`)")
    if not download:
        raise UsageError(f"dataset {name!r} is not prepared at {where}{also}; {ways}")
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # tfds raises many types; all mean "could not prepare"
        raise UsageError(f"could not download/prepare {name!r} into {where} ({first_line(e)}); "
                         f"{ways}") from e
    return builder


def _cache_key(name: str, split: str, record_dir: str) -> str:
    h = hashlib.sha256(f"{name}:{split}".encode())
    for entry in sorted(Path(record_dir).glob(f"*{split}.array_record*")):
        stat = entry.stat()
        h.update(f"{entry.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _decode(name: str, split: str, data_dir: str | None, num_examples: int, progress: bool):
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        first = source[0]
        images = np.empty((num_examples, *np.shape(first["image"])), np.uint8)
        labels = np.empty((num_examples,), np.int32)
        bar = _progress(num_examples, f"decoding {name}/{split} (once; cached)", progress)
        for start in range(0, num_examples, _DECODE_CHUNK):
            idx = list(range(start, min(start + _DECODE_CHUNK, num_examples)))
            for i, record in zip(idx, source.__getitems__(idx)):
                images[i] = record["image"]
                labels[i] = record["label"]
            bar.update(len(idx))
        bar.close()
    except (RuntimeError, OSError, ValueError) as e:  # Riegeli/array_record, PNG decoding
        import tensorflow_datasets as tfds

        files = split_files(tfds.builder(name, data_dir=data_dir), split)
        raise DataError(f"dataset {name}/{split}: {', '.join(files)} cannot be read "
                        f"({first_line(e)}); prepare the dataset again") from None
    return images, labels


def split_files(builder, split: str) -> list[str]:
    """The record files of a prepared split, by a TFDS builder."""
    return [str(Path(builder.data_dir) / f) for f in builder.info.splits[split].filenames]


def _progress(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(desc, total=total, unit="images", enabled=enabled)


def _write_atomically(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    fallbacks: tuple[str | os.PathLike, ...] = (),
) -> ArraySplit:
    """Loads a TFDS image-classification split as arrays, decoding at most once per machine.

    `fallbacks`: data dirs to look in when neither `data_dir`, $TFDS_DATA_DIR nor TFDS's default
    holds the dataset.

    Raises:
        UsageError: the dataset is not prepared under `data_dir` and `download` is False.
    """
    data_dir = resolve_data_dir(data_dir, name, fallbacks)
    builder = open_builder(name, data_dir, download, fallbacks)
    if split not in builder.info.splits:
        raise UsageError(f"{name} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    num_examples = builder.info.splits[split].num_examples
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(name, split, str(builder.data_dir))
    path = cache_dir / f"{name}-{builder.info.version}-{split}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as cached:
                images, labels = cached["images"], cached["labels"]
            if len(labels) == num_examples:
                return ArraySplit(images, labels)
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: decode again and replace it
    images, labels = _decode(name, split, data_dir, num_examples, progress)
    try:
        _write_atomically(path, images, labels)
    except OSError:
        pass  # a read-only cache is slower, not wrong
    return ArraySplit(images, labels)
