"""Real text on every machine: bytes of files as tokens (vocabulary 256, no tokenizer).

The default corpus is the Python standard library's own source, of the interpreter running the
job (`sysconfig`), so every machine that can run jaxdist has it and nothing is downloaded.
`text_files(patterns)` takes the user's files or globs instead. `prepare_tokens` writes each
split once as a flat uint8 `.npy` under `<cache_dir>/<key>/`, atomically (a temp dir in the same
parent, `manifest.json` written last, then `os.replace`); training maps it (`mmap_mode="r"`) and
reads it through a `Dataset`, so the usual contract holds: global batch k depends only on
(seed, k), each process reads its rows, any start step resumes exactly.

    corpus = jaxdist.data.load_text()                      # or load_text(["books/*.txt"])
    train = corpus.dataset("train", seq_len=256, global_batch=64, seed=0)
    for inputs, targets in train.batches(): ...            # int32 (local_batch, seq_len)
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from jaxdist.data.sources import Dataset
from jaxdist.data.tfds_source import default_cache_dir
from jaxdist.errors import DataError, UsageError, first_line
from jaxdist.progress import Progress

FORMAT_VERSION = 1
SEPARATOR = 0  # the byte after every file: an end-of-document token (source text has no NUL)
VOCAB_SIZE = 256
SPLITS = ("train", "validation")
# directories left out of the stdlib corpus (see `stdlib_files`)
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TESTS = frozenset({"test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter (a venv's base Python's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(*, include_tests: bool = False) -> list[Path]:
    """The standard library's `.py` files, sorted by their path relative to `stdlib_root()`.

    `site-packages`/`dist-packages` are left out: they are whatever was installed on this
    machine, not the interpreter's. Test directories (`test`, `tests`, `idle_test`) are left out
    by default because installs differ there: Debian ships them as a separate package and the
    official Docker images delete them, so without them the corpus is the same on every machine
    with the same Python (CPython 3.12: ~750 files, ~12 MB). `include_tests=True` adds them
    where present (~2,000 files, ~32 MB).
    """
    root = stdlib_root()
    skip = _NOT_STDLIB | (frozenset() if include_tests else _TESTS)
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]
        found += [Path(directory, n) for n in names if n.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def text_files(patterns: str | Sequence[str] | None) -> list[Path]:
    """The files named by `patterns` (paths, globs with `**`, directories: every file below),
    resolved, deduplicated and sorted; None: `stdlib_files()`.

    Raises:
        UsageError: a pattern that matches no file (one line naming it).
    """
    if patterns is None:
        return stdlib_files()
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    found: set[Path] = set()
    for pattern in map(str, patterns):
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            expanded = os.path.join(expanded, "**", "*")
        matches = [Path(m).resolve() for m in glob.glob(expanded, recursive=True)
                   if os.path.isfile(m)]
        if not matches:
            raise UsageError(f"text pattern {pattern!r} matches no files")
        found.update(matches)
    return sorted(found, key=str)


def is_validation(relative_path: str, fraction: float) -> bool:
    """Whether a file belongs to the validation split: a sha256 of its relative path (POSIX
    separators) below `fraction`, so the split is the same on every machine and in every order."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"the validation fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha256(b"jaxdist-text-split:" + relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
    """A prepared corpus: `train`, `validation` (uint8 arrays mapped from `directory`), `key`
    (the cache key), `files` (relative paths, in corpus order), `manifest` (what was written)."""

    train: np.ndarray
    validation: np.ndarray
    key: str
    directory: Path
    files: tuple[str, ...]
    manifest: dict
    name: str = "text"

    def dataset(self, split: str = "train", *, seq_len: int, global_batch: int, seed: int = 0,
                **kw) -> Dataset:
        """`from_tokens` of a split, named by the corpus's content hash (a resume from a
        checkpoint trained on other text is refused)."""
        if split not in SPLITS:
            raise UsageError(f"a text corpus has splits {', '.join(SPLITS)}, not {split!r}")
        digest = self.manifest[split]["sha256"][:12]
        kw.setdefault("name", f"{self.name}-{digest}/{split}")
        return from_tokens(getattr(self, split), seq_len=seq_len, global_batch=global_batch,
                           seed=seed, **kw)


def from_tokens(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int = 0,
                name: str = "text", **kw) -> Dataset:
    """Non-overlapping windows of a token array as a `Dataset`.

    Example i is `(inputs, targets)`, int32 of shape (seq_len,): the window
    `w = tokens[i*seq_len : i*seq_len + seq_len + 1]` as `(w[:-1], w[1:])` (a window's last
    target is the next window's first input). Batches are the same tuple with a leading batch
    dimension, read in one vectorized gather (from a memory map, only this process's rows).
    Throughput is counted in tokens (`unit`, `units_per_example`).

    Raises:
        UsageError: fewer than `seq_len + 1` tokens.
    """
    if seq_len < 1:
        raise UsageError(f"seq_len must be positive, got {seq_len}")
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise UsageError(f"{name}: {len(tokens):,} tokens are too few for one window of "
                         f"seq_len {seq_len} (needs {seq_len + 1})")
    offsets = np.arange(seq_len + 1, dtype=np.int64)

    def gather(indices):
        w = np.asarray(tokens[np.asarray(indices, np.int64)[:, None] * seq_len + offsets],
                       np.int32)
        return w[:, :-1], w[:, 1:]

    kw = {"unit": "tokens", "units_per_example": seq_len, **kw}
    settings = {"seq_len": seq_len, **kw.pop("settings", {})}  # a resume with another refused
    return Dataset(Windows(windows, gather), global_batch, seed, name=name, gather=gather,
                   settings=settings, **kw)


@dataclasses.dataclass(frozen=True)
class Windows:
    """`count` examples read through a vectorized `gather(indices) -> tuple of batches`, one at a
    time: the random-access source behind `from_tokens` and `documents.from_documents`."""

    count: int
    gather: Callable[[np.ndarray], tuple]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} of {self.count}")
        return tuple(part[0] for part in self.gather(np.array([i])))


def load_text(patterns: str | Sequence[str] | None = None, cache_dir: str | Path | None = None,
              *, validation_fraction: float = 0.05, progress: bool = True) -> TokenCorpus:
    """The user's files (`patterns`, see `text_files`) or the standard library (None),
    prepared once per machine (`prepare_tokens`; cache: $JAXDIST_CACHE_DIR/text)."""
    stdlib = patterns is None
    return prepare_tokens(text_files(patterns), cache_dir,
                          validation_fraction=validation_fraction,
                          root=stdlib_root() if stdlib else None, progress=progress,
                          name="stdlib" if stdlib else "text")


def prepare_tokens(files: Iterable[str | Path], cache_dir: str | Path | None = None, *,
                   validation_fraction: float = 0.05, root: str | Path | None = None,
                   progress: bool = True, name: str = "text") -> TokenCorpus:
    """Writes the token splits of `files` once and maps them.

    Files are ordered by their path relative to `root` (default: their common directory), each
    followed by one `SEPARATOR` byte, and go to validation by `is_validation` of that path. When
    that leaves a split empty (a corpus of one or a few files), the last `validation_fraction`
    of the concatenated bytes is the validation split instead (`manifest["split_by"]: "tail"`).

    The cache key is a sha256 of the format version, the fraction and each file's relative path,
    size and mtime (ns), so finding a prepared corpus costs one `stat` per file and a changed
    file is prepared again (a rewrite that keeps both size and mtime to the nanosecond is not
    seen). The manifest also records each split's sha256, which names the datasets. Output goes
    to a temp dir `<cache_dir>/.tmp-<key>-*`, `manifest.json` last, then is renamed to
    `<cache_dir>/<key>`; only a keyed dir with a manifest is ever read, so a crash leaves nothing
    that a later run would read, and processes preparing at once all end up with the same dir.

    Raises:
        UsageError: no files, a file outside `root`; DataError: a file that cannot be read.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "text"
    root, entries = corpus_entries(files, root, validation_fraction)
    key = hashlib.sha256(json.dumps(
        [FORMAT_VERSION, SEPARATOR, validation_fraction,
         [(e["path"], e["bytes"], e["mtime_ns"]) for e in entries]]).encode()).hexdigest()[:16]
    directory = cache_dir / key
    manifest = _read_manifest(directory)
    if manifest is None:
        manifest = _prepare(entries, root, directory, key, validation_fraction, progress, name)
        verb = "prepared"
    else:
        verb = "cached"
    corpus = _open(directory, manifest, name)
    if progress:
        label = "text" if name == "text" else f"{name} text"
        print(f"{verb} {label}: {len(corpus.files):,} files, {len(corpus.train) / 1e6:.1f} MB "
              f"train / {len(corpus.validation) / 1e6:.1f} MB validation -> {directory}",
              flush=True)
    return corpus


def corpus_entries(files: Iterable[str | Path], root: str | Path | None,
                   fraction: float) -> tuple[Path, list[dict]]:
    """(root, entries) of `files`: the root (default: their common directory) and, per file in
    relative-path order, its `path` relative to root, `bytes`, `mtime_ns` and `split`; what a
    cache key of the files is made of (one `stat` per file, nothing read).

    Raises:
        UsageError: no files, a file outside `root`; DataError: a file that cannot be stat'ed.
    """
    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise UsageError("no text files to prepare")
    root = Path(root).resolve() if root is not None else Path(
        os.path.commonpath([p.parent for p in paths]))
    return root, _stat(paths, root, fraction)


def _stat(paths: list[Path], root: Path, fraction: float) -> list[dict]:
    entries = {}
    for path in paths:
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            raise UsageError(f"text file {path} is not under the corpus root {root}") from None
        try:
            stat = path.stat()
        except OSError as e:
            raise DataError(f"text file {path} cannot be read ({first_line(e)})") from None
        entries[relative] = {"path": relative, "bytes": stat.st_size,
                             "mtime_ns": stat.st_mtime_ns,
                             "split": SPLITS[is_validation(relative, fraction)]}
    return [entries[k] for k in sorted(entries)]


def _read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete prepared dir; None when there is none (not prepared)."""
    path = directory / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"prepared text {path} cannot be read ({first_line(e)}); delete "
                        f"{directory} to prepare it again") from None


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _prepare(entries, root, directory, key, fraction, progress, name) -> dict:
    by_file = {s: sum(e["bytes"] + 1 for e in entries if e["split"] == s) for s in SPLITS}
    total = sum(by_file.values())
    tail = fraction > 0 and min(by_file.values()) == 0
    if tail:  # too few files to split by file: validation is the end of the stream
        cut = total - max(1, round(total * fraction)) if fraction < 1 else 0
        sizes = {"train": cut, "validation": total - cut}
    else:
        sizes = by_file
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{key}-"))
    try:
        sinks = {s: _Sink(tmp / f"{s}.npy", sizes[s]) for s in SPLITS}
        bar = Progress(f"preparing {name}", total=len(entries), unit="files",
                       enabled=progress)
        for entry in entries:
            data = _read_file(root / entry["path"], entry["bytes"]) + bytes([SEPARATOR])
            if tail:
                room = sinks["train"].room
                sinks["train"].write(data[:room])
                sinks["validation"].write(data[room:])
            else:
                sinks[entry["split"]].write(data)
            bar.update(1)
        bar.close()
        manifest = {"format": FORMAT_VERSION, "key": key, "root": str(root),
                    "validation_fraction": fraction, "separator": SEPARATOR,
                    "split_by": "tail" if tail else "file", "files": entries,
                    **{s: sinks[s].close() for s in SPLITS}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _install(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _read_manifest(directory)


def _read_file(path: Path, expected: int) -> bytes:
    try:
        data = _read_bytes(path)
    except OSError as e:
        raise DataError(f"text file {path} cannot be read ({first_line(e)})") from None
    if len(data) != expected:
        raise DataError(f"text file {path} changed while it was prepared; run again")
    return data


class _Sink:
    """A split being written: a preallocated uint8 .npy, filled in order, hashed as it goes."""

    def __init__(self, path: Path, size: int):
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size,))
        self.position, self.hash = 0, hashlib.sha256()

    @property
    def room(self) -> int:
        return len(self.array) - self.position

    def write(self, data: bytes) -> None:
        self.array[self.position:self.position + len(data)] = np.frombuffer(data, np.uint8)
        self.position += len(data)
        self.hash.update(data)

    def close(self) -> dict:
        assert self.position == len(self.array), "a split was not filled"
        self.array.flush()
        del self.array
        return {"bytes": self.position, "sha256": self.hash.hexdigest()}


def _install(tmp: Path, directory: Path) -> None:
    """Renames the complete temp dir to the keyed dir; another process that got there first
    wins (same key, same content) and this copy is dropped. A keyed dir without a manifest (left
    half-written by something other than `_prepare`) is not a prepared corpus: it is renamed
    aside, deleted and replaced (`os.replace` cannot replace a non-empty dir)."""
    for attempt in range(2):
        try:
            os.replace(tmp, directory)
            return
        except OSError as e:
            if (directory / "manifest.json").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if attempt:
                raise DataError(f"{directory} exists but is not a prepared corpus "
                                f"({first_line(e)}); delete it to prepare it again") from None
        stale = directory.with_name(f".tmp-{directory.name}-stale-{os.getpid()}-"
                                    f"{os.urandom(4).hex()}")
        try:
            os.replace(directory, stale)  # atomic: nothing reads a half-deleted keyed dir
        except OSError:  # gone meanwhile (the retry may well work), or cannot be moved (it fails)
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _open(directory: Path, manifest: dict, name: str) -> TokenCorpus:
    arrays = {}
    for split in SPLITS:
        path = directory / f"{split}.npy"
        try:
            arrays[split] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"prepared text {path} cannot be read ({first_line(e)}); delete "
                            f"{directory} to prepare it again") from None
        if len(arrays[split]) != manifest[split]["bytes"]:
            raise DataError(f"prepared text {path} has {len(arrays[split]):,} bytes, its "
                            f"manifest says {manifest[split]['bytes']:,}; delete {directory} "
                            f"to prepare it again")
    return TokenCorpus(arrays["train"], arrays["validation"], manifest["key"], directory,
                       tuple(e["path"] for e in manifest["files"]), manifest, name)
