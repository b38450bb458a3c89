"""Text as documents of a real tokenizer, packed into windows that say where documents begin.

`load_tokenizer(path)` reads a Hugging Face `tokenizer.json`; `train_bpe(files, vocab_size)`
trains a byte-level BPE on the corpus once (offline, cached under a key of the files) and loads
it after that. `prepare_documents` tokenizes each file as one document followed by the
end-of-document token (EOD), concatenates a split's documents into one stream and writes it once,
keyed and atomically like `jaxdist.data.text` (the same file listing, split and install), with the
start of every document beside it. Training reads it through a `Dataset` with the usual contract:
global batch k depends only on (seed, k), each process reads its rows, any start step resumes
exactly.

    files = jaxdist.data.text.text_files(["books/*.txt"])
    tok = train_bpe(files, 8192)                          # or load_tokenizer("tokenizer.json")
    corpus = prepare_documents(files, tok)
    train = corpus.dataset("train", seq_len=1024, global_batch=64, seed=0)
    for inputs, targets, segment_ids in train.batches(): ...     # int32 (local_batch, seq_len)

Window i is stream tokens [i*T, (i+1)*T) as inputs and the token after each as its target, so
every token of the stream is an input exactly once. `segment_ids` numbers the documents inside
the window from 1 (attention and positions can stay inside a document); the last window is
padded with token 0, segment 0 and target -1, and a target < 0 is one the loss ignores (the
stream's last token, an EOD, has no next token: target -1 as well). Evaluation batches follow
`Dataset.eval_batches`: `((inputs, targets, segment_ids), mask)`, the float32 mask 0 on the rows
that pad the last batch (they repeat window 0), which `jaxdist.fit` appends last:
`(inputs, targets, segment_ids, mask)`; a loss weighs a token by `(targets >= 0) * mask[:, None]`.

Cache layout (under `$JAXDIST_CACHE_DIR`, `~/.cache/jaxdist` by default, or the `cache_dir`
given), each dir complete with its `manifest.json` or absent:

    tokenizers/<key>/tokenizer.json           key: format, vocab_size, EOD, the files' stats
    documents/<key>/train.npy                 key: format, the tokenizer's key and EOD id,
                    train_starts.npy               validation fraction, the files' stats
                    validation.npy
                    validation_starts.npy

Tokens are uint16 (vocabularies up to 65,536) or uint32; `<split>_starts.npy` holds the int64
stream offset where each document of the split begins (0 first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from jaxdist.data import text
from jaxdist.data.sources import Dataset
from jaxdist.data.tfds_source import default_cache_dir
from jaxdist.errors import DataError, UsageError, first_line
from jaxdist.progress import Progress

FORMAT_VERSION = 1  # of prepared documents
TOKENIZER_FORMAT = 1  # of trained tokenizers
EOD = "<|endoftext|>"
# what a loaded tokenizer's end-of-document token may be called, in the order they are looked for
EOD_NAMES = (EOD, "<|end_of_text|>", "</s>", "<eos>")
MIN_BPE_VOCAB = 257  # the 256 bytes and EOD
_FILES_PER_BATCH = 64  # files per `encode_batch` call: the tokenizer's threads share them
_COPY_CHUNK = 1 << 24  # tokens per copy from the raw stream into a split's .npy


# --- tokenizers ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers.Tokenizer` (`backend`) with what the data path needs.

    `key` is a sha256 of the `tokenizer.json` bytes at `path`, so it names the tokenizer in run
    metadata and dataset settings wherever the file lives. `encode` adds no special tokens and
    reads special tokens in the text as text: only the packer ends a document.
    """

    backend: Any
    path: Path
    key: str
    eod_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def dtype(self) -> type:
        """The narrowest unsigned type holding every id: what prepared tokens are stored as."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    @property
    def meta(self) -> dict:
        """For run metadata and manifests."""
        return {"tokenizer": self.key, "tokenizer_path": str(self.path),
                "vocab_size": self.vocab_size, "eod_id": self.eod_id}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, on the tokenizer's threads."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens (EOD) written out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, *, eod: str | None = None) -> Tokenizer:
    """A Hugging Face `tokenizer.json` (or a directory holding one).

    The end-of-document token is `eod`, or else the first of `EOD_NAMES` in the vocabulary.

    Raises:
        UsageError: no such file, not a tokenizer.json, no end-of-document token (one line).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"tokenizer {path} cannot be read ({first_line(e)})") from None
    from tokenizers import Tokenizer as Backend  # here: jaxdist imports where it is missing

    try:  # from the bytes read, so the key is of exactly what was loaded
        backend = Backend.from_str(data.decode())
    except Exception as e:
        raise UsageError(f"{path} is not a tokenizer.json ({first_line(e)})") from None
    names = (eod,) if eod is not None else EOD_NAMES
    ids = [i for i in map(backend.token_to_id, names) if i is not None]
    if not ids:
        raise UsageError(f"tokenizer {path} has no end-of-document token "
                         f"{' or '.join(names)}; name its token with eod=")
    backend.encode_special_tokens = True  # "<|endoftext|>" in a file is text, not a boundary
    return Tokenizer(backend, path.resolve(), _digest(data), ids[0])


def train_bpe(files: Iterable[str | Path], vocab_size: int, cache_dir: str | Path | None = None,
              *, root: str | Path | None = None, progress: bool = True) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, merges, `EOD`) trained on `files`
    once and loaded from the cache after that.

    Any text encodes (every byte is a token) and decodes back exactly. The cache key is a sha256
    of the format, `vocab_size`, `EOD` and each file's path relative to `root` (default: their
    common directory), size and mtime, as for `text.prepare_tokens`, so finding a trained
    tokenizer reads no file; it is written to a temp dir and renamed into place (`text._install`).

    Raises:
        UsageError: `vocab_size` below `MIN_BPE_VOCAB`, no files, a file outside `root`;
        DataError: a file that cannot be read or is not UTF-8.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise UsageError(f"a byte-level BPE needs a vocabulary of at least {MIN_BPE_VOCAB} "
                         f"(256 bytes and {EOD}), got {vocab_size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    root, entries = text.corpus_entries(files, root, 0.0)
    key = _digest(json.dumps([TOKENIZER_FORMAT, "byte-level-bpe", vocab_size, EOD,
                              _stats(entries)]).encode())
    directory = cache_dir / key
    verb = "cached"
    if text._read_manifest(directory) is None:
        _train_bpe(entries, root, vocab_size, directory, key, progress)
        verb = "trained"
    tokenizer = load_tokenizer(directory / "tokenizer.json", eod=EOD)
    if progress:
        print(f"{verb} BPE tokenizer: vocabulary {tokenizer.vocab_size:,} from "
              f"{len(entries):,} files -> {tokenizer.path}", flush=True)
    return tokenizer


def _train_bpe(entries, root, vocab_size, directory, key, progress) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bar = Progress(f"training BPE {vocab_size}", total=len(entries), unit="files",
                   enabled=progress)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{key}-"))
    try:
        backend.train_from_iterator(_counted(_texts(entries, root), bar), trainer,
                                    length=len(entries))
        bar.close()
        backend.save(str(tmp / "tokenizer.json"))
        manifest = {"format": TOKENIZER_FORMAT, "key": key, "kind": "byte-level-bpe",
                    "vocab_size": vocab_size, "eod": EOD, "root": str(root), "files": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        text._install(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- documents -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocumentCorpus:
    """A prepared corpus: each split's tokens (`train`, `validation`, mapped from `directory`)
    and the offsets where its documents begin (`train_starts`, `validation_starts`), the
    `tokenizer` that made them, `key` (the cache key), `files` (relative paths, in corpus order)
    and `manifest` (what was written)."""

    train: np.ndarray
    validation: np.ndarray
    train_starts: np.ndarray
    validation_starts: np.ndarray
    tokenizer: Tokenizer
    key: str
    directory: Path
    files: tuple[str, ...]
    manifest: dict
    name: str = "text"

    def bytes_per_token(self, split: str = "validation") -> float:
        """Bytes of text per token of a split (end-of-document tokens counted as tokens): turns a
        loss per token into bits per byte, comparable across tokenizers. From the files' sizes
        where the split is whole files, else by decoding the split."""
        tokens = getattr(self, split)
        if not len(tokens):
            return math.nan
        if self.manifest.get("split_by") == "file":
            size = sum(e["bytes"] for e in self.manifest["files"] if e["split"] == split)
        else:
            ids = np.asarray(tokens)
            size = len(self.tokenizer.decode(ids[ids != self.tokenizer.eod_id].tolist())
                       .encode("utf-8"))
        return size / len(tokens)

    def dataset(self, split: str = "train", *, seq_len: int, global_batch: int, seed: int = 0,
                **kw) -> Dataset:
        """`from_documents` of a split, named by its content hash and set to its tokenizer (a
        resume from a checkpoint trained on other tokens is refused)."""
        if split not in text.SPLITS:
            raise UsageError(f"a document corpus has splits {', '.join(text.SPLITS)}, "
                             f"not {split!r}")
        kw.setdefault("name", f"{self.name}-{self.manifest[split]['sha256'][:12]}/{split}")
        return from_documents(getattr(self, split), getattr(self, f"{split}_starts"),
                              seq_len=seq_len, global_batch=global_batch, seed=seed,
                              tokenizer=self.tokenizer, **kw)


def from_documents(tokens: np.ndarray, doc_starts: np.ndarray, *, seq_len: int,
                   global_batch: int, seed: int = 0, tokenizer: Tokenizer | None = None,
                   name: str = "documents", **kw) -> Dataset:
    """Packed windows of a document stream as a `Dataset` of `(inputs, targets, segment_ids)`.

    `tokens` is the stream, `doc_starts` the increasing offsets where its documents begin (0
    first). Example i, int32 of shape (seq_len,) each: inputs `tokens[i*seq_len:(i+1)*seq_len]`,
    targets the token after each (-1 past the stream's end), segment ids the documents in the
    window numbered from 1 (a document that runs on from the window before is 1); the last window
    is padded with input 0, target -1, segment 0. Settings (what a resume must match): seq_len,
    and with `tokenizer` its key and vocabulary size.

    Raises:
        UsageError: no tokens, `seq_len` < 1, `doc_starts` not as described.
    """
    if seq_len < 1:
        raise UsageError(f"seq_len must be positive, got {seq_len}")
    n = len(tokens)
    if n < 1:
        raise UsageError(f"{name} has no tokens")
    starts = np.asarray(doc_starts, np.int64)
    if (starts.ndim != 1 or not len(starts) or starts[0] != 0 or starts[-1] >= n
            or np.any(np.diff(starts) <= 0)):
        raise UsageError(f"{name}: doc_starts must begin at 0 and increase within the "
                         f"{n:,} tokens")
    windows = -(-n // seq_len)
    offsets = np.arange(seq_len + 1, dtype=np.int64)

    def gather(indices):
        positions = np.asarray(indices, np.int64)[:, None] * seq_len + offsets
        w = np.asarray(tokens[np.minimum(positions, n - 1)], np.int32)
        real = positions < n  # of inputs (:-1) and of targets (1:)
        inputs = np.where(real[:, :-1], w[:, :-1], 0)
        targets = np.where(real[:, 1:], w[:, 1:], -1)
        document = np.searchsorted(starts, positions[:, :-1], side="right")
        segments = np.where(real[:, :-1], document - document[:, :1] + 1, 0)
        return inputs, targets, segments.astype(np.int32)

    settings = {"seq_len": seq_len}  # a resume with other values is refused
    if tokenizer is not None:
        settings |= {"tokenizer": tokenizer.key, "vocab_size": tokenizer.vocab_size}
    kw = {"unit": "tokens", "units_per_example": seq_len, **kw}
    settings |= kw.pop("settings", {})
    return Dataset(text.Windows(windows, gather), global_batch, seed, name=name, gather=gather,
                   settings=settings, **kw)


def load_documents(patterns: str | Sequence[str] | None, tokenizer: Tokenizer | str | Path,
                   cache_dir: str | Path | None = None, *, validation_fraction: float = 0.05,
                   progress: bool = True) -> DocumentCorpus:
    """The user's files (`patterns`, see `text.text_files`) or the standard library (None),
    tokenized by `tokenizer` (or the tokenizer.json at that path) and prepared once per machine
    (`prepare_documents`; cache: $JAXDIST_CACHE_DIR/documents)."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    stdlib = patterns is None
    return prepare_documents(text.text_files(patterns), tokenizer, cache_dir,
                             validation_fraction=validation_fraction,
                             root=text.stdlib_root() if stdlib else None, progress=progress,
                             name="stdlib" if stdlib else "text")


def prepare_documents(files: Iterable[str | Path], tokenizer: Tokenizer,
                      cache_dir: str | Path | None = None, *, validation_fraction: float = 0.05,
                      root: str | Path | None = None, progress: bool = True,
                      name: str = "text") -> DocumentCorpus:
    """Writes the document streams of `files` once and maps them.

    Files are ordered, split and keyed as in `text.prepare_tokens` (a validation file by
    `text.is_validation` of its relative path; when that leaves a split empty, validation is the
    last `validation_fraction` of the tokens, its first document possibly the end of one cut in
    two), with the tokenizer's key and EOD id in the key. Each file is one UTF-8 document: its
    tokens, then EOD.

    Raises:
        UsageError: no files, a file outside `root`.
        DataError: a file that cannot be read or is not UTF-8.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "documents"
    root, entries = text.corpus_entries(files, root, validation_fraction)
    key = _digest(json.dumps([FORMAT_VERSION, tokenizer.key, tokenizer.eod_id,
                              validation_fraction, _stats(entries)]).encode())
    directory = cache_dir / key
    manifest = text._read_manifest(directory)
    verb = "cached"
    if manifest is None:
        manifest = _prepare(entries, root, tokenizer, directory, key, validation_fraction,
                            progress, name)
        verb = "prepared"
    corpus = _open(directory, manifest, tokenizer, name)
    if progress:
        label = "documents" if name == "text" else f"{name} documents"
        print(f"{verb} {label}: {len(corpus.files):,} files, {len(corpus.train) / 1e6:.2f}M "
              f"tokens train / {len(corpus.validation) / 1e6:.2f}M validation (vocabulary "
              f"{tokenizer.vocab_size:,}) -> {directory}", flush=True)
    return corpus


def _prepare(entries, root, tokenizer, directory, key, fraction, progress, name) -> dict:
    by_file = {s: sum(e["split"] == s for e in entries) for s in text.SPLITS}
    tail = fraction > 0 and min(by_file.values()) == 0
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{key}-"))
    streams = {}
    try:
        streams = {s: _Stream(tmp / f"{s}.tokens", tokenizer.dtype, tokenizer.eod_id)
                   for s in (("all",) if tail else text.SPLITS)}
        bar = Progress(f"tokenizing {name}", total=len(entries), unit="files",
                       enabled=progress)
        for i in range(0, len(entries), _FILES_PER_BATCH):
            chunk = entries[i:i + _FILES_PER_BATCH]
            texts = [_decode(root / e["path"], e["bytes"]) for e in chunk]
            for entry, ids in zip(chunk, tokenizer.encode_batch(texts)):
                streams["all" if tail else entry["split"]].append(ids)
            bar.update(len(chunk))
        bar.close()
        if tail:  # too few files to split by file: validation is the end of the stream
            stream = streams["all"]
            total = stream.close()
            cut = total - max(1, round(total * fraction)) if fraction < 1 else 0
            splits = {"train": (stream, 0, cut), "validation": (stream, cut, total)}
        else:
            splits = {s: (streams[s], 0, streams[s].close()) for s in text.SPLITS}
        written = {s: _write_split(tmp, s, *splits[s]) for s in text.SPLITS}
        for stream in streams.values():
            stream.path.unlink()
        manifest = {"format": FORMAT_VERSION, "key": key, "root": str(root),
                    "validation_fraction": fraction, "split_by": "tail" if tail else "file",
                    "dtype": np.dtype(tokenizer.dtype).name, **tokenizer.meta,
                    "files": entries, **written}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        text._install(tmp, directory)
    except BaseException:
        for stream in streams.values():
            stream.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return text._read_manifest(directory)


class _Stream:
    """Documents being tokenized: their tokens and EOD appended raw to a file, starts kept."""

    def __init__(self, path: Path, dtype, eod_id: int):
        self.path, self.dtype, self.eod_id = path, np.dtype(dtype), eod_id
        self.file = open(path, "wb")
        self.length, self.starts = 0, []

    def append(self, ids: list[int]) -> None:
        self.starts.append(self.length)
        self.file.write(np.asarray([*ids, self.eod_id], self.dtype).tobytes())
        self.length += len(ids) + 1

    def close(self) -> int:
        self.file.close()
        return self.length


def _write_split(tmp: Path, split: str, stream: _Stream, lo: int, hi: int) -> dict:
    """Tokens [lo, hi) of `stream` as `<split>.npy` and its document starts as
    `<split>_starts.npy` (a split that begins inside a document starts one at 0)."""
    out = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=stream.dtype,
                                    shape=(hi - lo,))
    digest = hashlib.sha256()
    if hi > lo:
        raw = np.memmap(stream.path, dtype=stream.dtype, mode="r", shape=(stream.length,))
        for start in range(lo, hi, _COPY_CHUNK):
            part = np.asarray(raw[start:min(hi, start + _COPY_CHUNK)])
            out[start - lo:start - lo + len(part)] = part
            digest.update(part.tobytes())
        del raw
    out.flush()
    del out
    starts = np.asarray(stream.starts, np.int64)
    starts = starts[(starts >= lo) & (starts < hi)] - lo
    if hi > lo and (not len(starts) or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    np.save(tmp / f"{split}_starts.npy", starts)
    digest.update(starts.tobytes())
    return {"tokens": hi - lo, "documents": len(starts), "sha256": digest.hexdigest()}


def _open(directory: Path, manifest: dict, tokenizer: Tokenizer, name: str) -> DocumentCorpus:
    arrays = {}
    for split in text.SPLITS:
        for part in (split, f"{split}_starts"):
            path = directory / f"{part}.npy"
            try:
                arrays[part] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"prepared documents {path} cannot be read ({first_line(e)}); "
                                f"delete {directory} to prepare them again") from None
        counts = {split: len(arrays[split]), f"{split}_starts": len(arrays[f"{split}_starts"])}
        expected = {split: manifest[split]["tokens"],
                    f"{split}_starts": manifest[split]["documents"]}
        if counts != expected:
            raise DataError(f"prepared documents in {directory} hold {counts}, their manifest "
                            f"says {expected}; delete {directory} to prepare them again")
    return DocumentCorpus(**arrays, tokenizer=tokenizer, key=manifest["key"],
                          directory=directory, files=tuple(e["path"] for e in manifest["files"]),
                          manifest=manifest, name=name)


# --- helpers -------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _stats(entries: list[dict]) -> list:
    """What a cache key holds of the files: relative path, size, mtime."""
    return [(e["path"], e["bytes"], e["mtime_ns"]) for e in entries]


def _texts(entries: list[dict], root: Path) -> Iterator[str]:
    for entry in entries:
        yield _decode(root / entry["path"], entry["bytes"])


def _decode(path: Path, size: int) -> str:
    """A file's text (read through `text._read_file`: its size is checked against the key's)."""
    try:
        return text._read_file(path, size).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not UTF-8 ({first_line(e)}); leave it out of "
                        f"the corpus") from None


def _counted(items: Iterator, bar: Progress) -> Iterator:
    for item in items:
        yield item
        bar.update(1)
