"""Documents through `jaxdist.data.documents`: a real tokenizer (a Hugging Face tokenizer.json, or
a byte-level BPE trained once on the corpus and cached), each file one document ended by EOD,
a split's documents one stream with their starts beside it, prepared once per machine under a
key, and read as packed windows `(inputs, targets, segment_ids)` in which every token of the
stream is an input exactly once."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from jaxdist.data import documents
from jaxdist.data import text as text_module
from jaxdist.errors import DataError, UsageError

FILES = {  # relative path -> text: documents of many lengths, in no particular order
    "b/two.txt": "second file, in a directory\n" * 3,
    "a.txt": "alpha beta gamma delta " * 20,
    "c/d/deep.py": "def f(x):\n    return x + 1\n\n\nprint(f(41))\n",
    "b/one.txt": "first of b: café, naïve, 東京, emoji 😀\n",
    "empty.txt": "",  # a document of just EOD
    "z.md": "# the last one\n\nIt mentions <|endoftext|> as text, not as a boundary.\n",
    "c/e.txt": "e",
    "m.txt": "the middle of the alphabet, where most words are. " * 8,
    "b/three.txt": "third of b\ttabs\r\nand CRLF\r\n",
}
SAMPLES = ["", "hello world", "  leading spaces\n\n\ttabs", "unicode: ßÜ 東京 😀 \u200b",
           "a literal <|endoftext|> in text", "x" * 100, "\x00\x01 control bytes \x7f"]


def _write(root: Path, files: dict) -> list[Path]:
    paths = []
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of 300 tokens trained on the corpus."""
    root = tmp_path_factory.mktemp("bpe-corpus")
    return documents.train_bpe(_write(root, FILES), 300, tmp_path_factory.mktemp("bpe-cache"),
                               progress=False)


@pytest.fixture
def corpus(tmp_path):
    """(root, files in the order written, the cache dir) of the corpus."""
    root = tmp_path / "corpus"
    return root, _write(root, FILES), tmp_path / "cache"


def _prepare(files, tokenizer, cache, **kw):
    kw.setdefault("progress", False)
    return documents.prepare_documents(files, tokenizer, cache, **kw)


def _documents(tokenizer, relatives, files=FILES) -> list[list[int]]:
    """Each file's tokens and EOD: the documents as a split holds them."""
    return [tokenizer.encode(files[r]) + [tokenizer.eod_id] for r in relatives]


def _windows(ds) -> list[tuple[np.ndarray, ...]]:
    return [ds.source[i] for i in range(len(ds))]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _unpacked(windows) -> tuple[np.ndarray, np.ndarray]:
    """The real inputs of all windows in order, and their targets."""
    inputs = np.concatenate([w[0][w[2] > 0] for w in windows])
    targets = np.concatenate([w[1][w[2] > 0] for w in windows])
    return inputs, targets


# --- tokenizers ----------------------------------------------------------------------------------


def test_the_bpe_has_every_byte_and_eod_and_round_trips_any_text(bpe):
    assert bpe.vocab_size == 300
    assert bpe.backend.token_to_id(documents.EOD) == bpe.eod_id
    assert bpe.dtype == np.uint16
    for sample in [*SAMPLES, *FILES.values()]:
        ids = bpe.encode(sample)
        assert bpe.decode(ids) == sample
        assert bpe.eod_id not in ids  # only the packer ends a document
        assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]
    assert len(bpe.encode(FILES["a.txt"])) < len(FILES["a.txt"]) / 2  # it learned merges
    assert bpe.decode([bpe.eod_id]) == documents.EOD
    assert bpe.key == hashlib.sha256(bpe.path.read_bytes()).hexdigest()[:16]


def test_a_second_train_bpe_loads_the_cached_one_without_reading_or_training(
        corpus, monkeypatch, capsys):
    root, paths, cache = corpus
    first = documents.train_bpe(paths, 300, cache, progress=False)
    mtime = first.path.stat().st_mtime_ns

    def no_reads(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(text_module, "_read_bytes", no_reads)
    again = documents.train_bpe(reversed(paths), 300, cache, progress=True)
    assert capsys.readouterr().out.startswith("cached BPE tokenizer: vocabulary 300 from 9 files")
    assert again.key == first.key and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime
    assert again.encode(SAMPLES[3]) == first.encode(SAMPLES[3])
    assert sorted(p.name for p in cache.iterdir()) == [first.path.parent.name]
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    assert manifest["vocab_size"] == 300 and len(manifest["files"]) == 9
    monkeypatch.undo()
    bigger = documents.train_bpe(paths, 320, cache, progress=False)  # another size: trained
    assert bigger.path.parent != first.path.parent and bigger.vocab_size == 320
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_crash_while_training_leaves_nothing_that_a_later_run_would_read(corpus, monkeypatch):
    root, paths, cache = corpus
    reads = []

    def read_then_crash(path):
        reads.append(path)
        if len(reads) == 3:
            raise KeyboardInterrupt
        return path.read_bytes()

    monkeypatch.setattr(text_module, "_read_bytes", read_then_crash)
    with pytest.raises(KeyboardInterrupt):
        documents.train_bpe(paths, 300, cache, progress=False)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert documents.train_bpe(paths, 300, cache, progress=False).vocab_size == 300


def test_a_tokenizer_json_saved_by_tokenizers_loads_and_gives_the_same_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.BPEDecoder()
    backend.train_from_iterator(FILES.values(), trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False))
    path = tmp_path / "hub" / "tokenizer.json"
    path.parent.mkdir()
    backend.save(str(path))
    loaded = documents.load_tokenizer(path)
    assert loaded.eod_id == backend.token_to_id("</s>")  # found among EOD_NAMES
    assert loaded.vocab_size == backend.get_vocab_size()
    assert loaded.key == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert loaded.path == path.resolve()
    for sample in FILES.values():
        assert loaded.encode(sample) == backend.encode(sample, add_special_tokens=False).ids
    assert documents.load_tokenizer(path.parent).key == loaded.key  # a model's directory
    named = documents.load_tokenizer(path, eod="<unk>")
    assert named.eod_id == backend.token_to_id("<unk>")
    assert named.meta == {"tokenizer": loaded.key, "tokenizer_path": str(path.resolve()),
                          "vocab_size": loaded.vocab_size, "eod_id": named.eod_id}


def test_bad_tokenizer_input_is_a_one_line_usage_error(tmp_path, bpe):
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("{ not json")
    corpus = _write(tmp_path / "corpus", {"a.txt": "some text"})
    cases = [
        (lambda: documents.load_tokenizer(tmp_path / "missing.json"), "missing.json"),
        (lambda: documents.load_tokenizer(not_json), "is not a tokenizer.json"),
        (lambda: documents.load_tokenizer(bpe.path, eod="<|no such token|>"), "eod="),
        (lambda: documents.train_bpe(corpus, 256, tmp_path / "c"), "at least 257"),
        (lambda: documents.train_bpe([tmp_path / "nowhere.txt"], 300, tmp_path / "c"),
         "nowhere.txt"),
        (lambda: documents.train_bpe([], 300, tmp_path / "c"), "no text files"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_ids_are_stored_in_the_narrowest_type_that_holds_the_vocabulary(bpe):
    class Vocabulary:
        def __init__(self, size):
            self.size = size

        def get_vocab_size(self, with_added_tokens=True):
            return self.size

    def dtype(size):
        return documents.Tokenizer(Vocabulary(size), Path("t.json"), "k", 0).dtype

    assert dtype(300) == dtype(1 << 16) == np.uint16
    assert dtype((1 << 16) + 1) == dtype(200_000) == np.uint32


# --- preparing documents -------------------------------------------------------------------------


def test_a_split_is_its_files_tokens_each_ended_by_eod_in_relative_path_order(corpus, bpe):
    root, paths, cache = corpus
    fraction = 0.3  # with these names, both splits get files
    c = _prepare(reversed(paths), bpe, cache, validation_fraction=fraction)
    order = sorted(FILES)
    assert c.files == tuple(order) and c.manifest["split_by"] == "file"
    for split in text_module.SPLITS:
        relatives = [r for r in order
                     if text_module.is_validation(r, fraction) == (split == "validation")]
        assert relatives, "pick a corpus that both splits get files of"
        docs = _documents(bpe, relatives)
        tokens, starts = getattr(c, split), getattr(c, f"{split}_starts")
        assert tokens.dtype == np.uint16 and starts.dtype == np.int64
        np.testing.assert_array_equal(tokens, np.concatenate(docs))
        np.testing.assert_array_equal(starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
        assert c.manifest[split]["tokens"] == len(tokens)
        assert c.manifest[split]["documents"] == len(relatives)
    assert c.manifest["tokenizer"] == bpe.key and c.manifest["vocab_size"] == 300
    assert sorted(p.name for p in c.directory.iterdir()) == [
        "manifest.json", "train.npy", "train_starts.npy", "validation.npy",
        "validation_starts.npy"]
    assert sorted(p.name for p in cache.iterdir()) == [c.key]


def test_prepared_documents_are_found_again_without_reading_and_keyed_by_the_tokenizer(
        corpus, bpe, monkeypatch, capsys, tmp_path):
    root, paths, cache = corpus
    first = _prepare(paths, bpe, cache)
    mtime = (first.directory / "train.npy").stat().st_mtime_ns

    def no_reads(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(text_module, "_read_bytes", no_reads)
    again = documents.prepare_documents(paths, bpe, cache, progress=True)
    assert capsys.readouterr().out.startswith("cached documents: 9 files")
    assert again.key == first.key and again.directory == first.directory
    assert (first.directory / "train.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.train, first.train)
    monkeypatch.undo()
    other = documents.train_bpe(paths, 280, tmp_path / "tok", progress=False)
    assert _prepare(paths, other, cache).key != first.key


def test_a_crash_while_preparing_leaves_nothing_that_a_later_run_would_read(corpus, bpe,
                                                                            monkeypatch):
    root, paths, cache = corpus
    reads = []

    def read_then_crash(path):
        reads.append(path)
        if len(reads) == 4:
            raise OSError("disk gone")
        return path.read_bytes()

    monkeypatch.setattr(text_module, "_read_bytes", read_then_crash)
    with pytest.raises(DataError, match="disk gone"):
        _prepare(paths, bpe, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    c = _prepare(paths, bpe, cache, validation_fraction=0.0)
    np.testing.assert_array_equal(c.train, np.concatenate(_documents(bpe, sorted(FILES))))


def test_a_file_that_is_not_utf8_is_a_data_error_naming_it(tmp_path, bpe):
    paths = _write(tmp_path / "corpus", {"good.txt": "fine", "bad.bin": b"\xff\xfe\x00binary"})
    with pytest.raises(DataError, match="bad.bin is not UTF-8"):
        _prepare(paths, bpe, tmp_path / "cache")


def test_a_corpus_too_small_to_split_by_file_takes_validation_from_the_tail(tmp_path, bpe):
    files = {"only.txt": FILES["m.txt"], "second.txt": FILES["a.txt"]}
    c = _prepare(_write(tmp_path / "two", files), bpe, tmp_path / "cache",
                 validation_fraction=0.3)  # with these names, both files are training files
    assert c.manifest["split_by"] == "tail"
    docs = _documents(bpe, sorted(files), files)
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(np.concatenate([c.train, c.validation]), stream)
    assert len(c.validation) == round(len(stream) * 0.3)
    second, cut = len(docs[0]), len(c.train)
    assert second < cut, "pick documents that the cut falls in the second of"
    assert c.train_starts.tolist() == [0, second]
    assert c.validation_starts.tolist() == [0]  # the end of the second document


# --- packed windows ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64, 1000])
def test_windows_hold_every_token_of_the_stream_once_with_its_next_token_as_target(
        corpus, bpe, seq_len):
    root, paths, cache = corpus
    c = _prepare(paths, bpe, cache, validation_fraction=0.0)
    ds = c.dataset("train", seq_len=seq_len, global_batch=1, process_index=0, process_count=1)
    stream = np.asarray(c.train, np.int64)
    assert len(ds) == -(-len(stream) // seq_len)
    windows = _windows(ds)
    for inputs, targets, segments in windows:
        assert inputs.shape == targets.shape == segments.shape == (seq_len,)
        assert inputs.dtype == targets.dtype == segments.dtype == np.int32
    inputs, targets = _unpacked(windows)
    np.testing.assert_array_equal(inputs, stream)  # nothing lost, nothing twice
    np.testing.assert_array_equal(targets, np.append(stream[1:], -1))
    # each document (its tokens and EOD) is one run of the stream, at its stored start
    ends = np.append(c.train_starts[1:], len(stream))
    docs = [inputs[s:e].tolist() for s, e in zip(c.train_starts, ends)]
    assert docs == _documents(bpe, sorted(FILES))


@pytest.mark.parametrize("seq_len", [1, 3, 5, 8, 13])
def test_segment_ids_number_the_documents_in_a_window_from_one(seq_len):
    lengths = [1, 9, 2, 1, 5, 3, 1, 4]  # longer and shorter than a window
    starts = np.cumsum([0] + lengths[:-1])
    tokens = np.arange(100, 100 + sum(lengths), dtype=np.uint16)
    document_of = np.repeat(np.arange(len(lengths)), lengths)
    ds = documents.from_documents(tokens, starts, seq_len=seq_len, global_batch=1,
                                  process_index=0, process_count=1)
    for i, (inputs, targets, segments) in enumerate(_windows(ds)):
        positions = i * seq_len + np.arange(seq_len)
        real = positions < len(tokens)
        first = document_of[positions[0]]
        np.testing.assert_array_equal(segments[real], document_of[positions[real]] - first + 1)
        assert segments[0] == 1  # a document that runs on is 1 again
        changes = np.flatnonzero(np.diff(segments[real]) != 0) + 1
        np.testing.assert_array_equal(positions[changes], np.intersect1d(positions[real][1:],
                                                                         starts))
    # boundaries come from `doc_starts`, never from the tokens
    same_tokens = documents.from_documents(tokens, [0], seq_len=seq_len, global_batch=1,
                                           process_index=0, process_count=1)
    assert all(np.all(w[2][w[2] > 0] == 1) for w in _windows(same_tokens))


@pytest.mark.parametrize("n", [20, 21, 23, 24])
def test_only_the_last_window_is_padded_with_token_0_segment_0_and_target_minus_1(n):
    seq_len = 4 if n % 4 else 6  # 24 and 6: no padding at all, only the last target
    tokens = np.arange(1, n + 1, dtype=np.uint16)
    ds = documents.from_documents(tokens, [0, 3, 10], seq_len=seq_len, global_batch=1,
                                  process_index=0, process_count=1)
    windows = _windows(ds)
    for inputs, targets, segments in windows[:-1]:
        assert np.all(segments > 0) and np.all(targets > 0) and np.all(inputs > 0)
    inputs, targets, segments = windows[-1]
    real = (len(windows) - 1) * seq_len + np.arange(seq_len) < n
    assert np.all(inputs[~real] == 0) and np.all(segments[~real] == 0)
    assert np.all(targets[~real] == -1)
    assert targets[real][-1] == -1  # the stream's last token has no next one
    assert np.all(targets[real][:-1] > 0) and np.all(segments[real] > 0)


def test_bad_documents_are_a_usage_error():
    tokens = np.arange(10, dtype=np.uint16)
    for starts in ([], [1, 5], [0, 5, 5], [0, 10], [[0]]):
        with pytest.raises(UsageError, match="doc_starts"):
            documents.from_documents(tokens, starts, seq_len=4, global_batch=1)
    with pytest.raises(UsageError, match="no tokens"):
        documents.from_documents(tokens[:0], [0], seq_len=4, global_batch=1)
    with pytest.raises(UsageError, match="seq_len"):
        documents.from_documents(tokens, [0], seq_len=0, global_batch=1)


def test_batches_resume_exactly_and_each_process_gets_its_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 60)
    tokens = rng.integers(1, 300, lengths.sum()).astype(np.uint16)
    starts = np.cumsum(np.append(0, lengths[:-1]))
    L, B = 8, 6

    def run(seed=1, start=0, k=12, **kw):
        ds = documents.from_documents(tokens, starts, seq_len=L, global_batch=B, seed=seed, **kw)
        return _take(ds.batches(start_step=start), k)

    one = run(process_index=0, process_count=1)
    for batch in one:
        assert len(batch) == 3
        assert all(part.shape == (B, L) and part.dtype == np.int32 for part in batch)
    halves = [run(process_index=p, process_count=2) for p in range(2)]
    resumed = run(start=9, k=3, process_index=0, process_count=1)
    for k in range(12):
        for part in range(3):
            assert halves[0][k][part].shape == (B // 2, L)
            np.testing.assert_array_equal(
                np.concatenate([halves[0][k][part], halves[1][k][part]]), one[k][part])
    for a, b in zip(resumed, one[9:]):
        for part in range(3):
            np.testing.assert_array_equal(a[part], b[part])
    again = run(process_index=0, process_count=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again, one))
    other_seed = run(seed=2, process_index=0, process_count=1)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(other_seed, one))
    # over one epoch (the windows in some order) every token is an input once
    ds = documents.from_documents(tokens, starts, seq_len=L, global_batch=1, seed=3,
                                  process_index=0, process_count=1)
    epoch = _take(ds.batches(), len(ds))
    assert sorted(_unpacked([tuple(p[0] for p in b) for b in epoch])[0].tolist()) == sorted(
        tokens.tolist())


def test_evaluation_batches_add_a_mask_of_the_real_rows(corpus, bpe):
    root, paths, cache = corpus
    c = _prepare(paths, bpe, cache, validation_fraction=0.0)
    ds = c.dataset("train", seq_len=16, global_batch=4, process_index=1, process_count=2)
    batches = list(ds.eval_batches(global_batch=4))
    assert len(batches) == -(-len(ds) // 4)
    rows = []
    for (inputs, targets, segments), mask in batches:
        assert inputs.shape == targets.shape == segments.shape == (2, 16)
        assert mask.dtype == np.float32 and mask.shape == (2,)
        rows += [(inputs[r], int(mask[r])) for r in range(2)]
    mine = [i for start in range(0, 4 * len(batches), 4) for i in (start + 2, start + 3)]
    for (inputs, real), i in zip(rows, mine):
        assert real == (i < len(ds))
        np.testing.assert_array_equal(inputs, ds.source[i if i < len(ds) else 0][0])


def test_a_dataset_is_named_by_its_tokens_and_set_to_its_tokenizer(corpus, bpe, tmp_path):
    root, paths, cache = corpus
    c = _prepare(paths, bpe, cache, validation_fraction=0.3)
    kw = dict(seq_len=8, global_batch=2, process_index=0, process_count=1)
    train = c.dataset("train", **kw)
    assert train.name == f"text-{c.manifest['train']['sha256'][:12]}/train"
    assert train.meta["seq_len"] == 8
    assert train.meta["tokenizer"] == bpe.key and train.meta["vocab_size"] == bpe.vocab_size
    assert train.unit == "tokens" and train.units_per_example == 8
    assert c.dataset("validation", **kw).name != train.name
    other = documents.train_bpe(paths, 290, tmp_path / "tok", progress=False)
    retokenized = _prepare(paths, other, cache, validation_fraction=0.3).dataset("train", **kw)
    assert retokenized.meta["tokenizer"] != train.meta["tokenizer"]  # a resume is refused
    assert retokenized.meta["vocab_size"] == 290
    with pytest.raises(UsageError, match="test"):
        c.dataset("test", **kw)


def test_load_documents_prepares_the_users_files_with_a_tokenizer_path(corpus, bpe):
    root, paths, cache = corpus
    c = documents.load_documents([str(root)], str(bpe.path), cache, validation_fraction=0.0,
                                 progress=False)
    assert c.files == tuple(sorted(FILES)) and c.tokenizer.key == bpe.key
    np.testing.assert_array_equal(c.train, np.concatenate(_documents(bpe, sorted(FILES))))
