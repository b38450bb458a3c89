"""Text as bytes through `jaxdist.data.text`: the standard library (or the user's files) in one
fixed order, each file followed by one 0 byte, prepared once per machine under a key of the
files' paths, sizes and mtimes, atomically (a crash or a half-written dir is never read), and
read as non-overlapping token windows whose global batch k depends only on (seed, k)."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

from jaxdist import data
from jaxdist.data import text as text_module
from jaxdist.errors import DataError, UsageError

FILES = {  # relative path -> content: a tiny corpus, in no particular order
    "b/two.txt": b"second file, in a directory\n",
    "a.txt": b"alpha alpha alpha\n",
    "c/d/deep.py": b"def f():\n    return 1\n",
    "b/one.txt": b"first of b\n",
    "z.md": b"# the last one\n",
    "c/e.txt": b"e" * 40,
    "m.txt": b"middle of the alphabet\n",
    "b/three.txt": b"third of b",
}


def _write(root: Path, files: dict) -> list[Path]:
    paths = []
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        paths.append(path)
    return paths


@pytest.fixture
def corpus(tmp_path):
    """(root, files in the order written, the cache dir) of the tiny corpus."""
    root = tmp_path / "corpus"
    return root, _write(root, FILES), tmp_path / "cache"


def _prepare(files, cache, **kw):
    kw.setdefault("progress", False)
    return text_module.prepare_tokens(files, cache, **kw)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


def _stream(files: dict, relatives) -> bytes:
    return b"".join(files[r] + b"\0" for r in relatives)


def _assert_holds(c, files: dict, fraction: float = 0.05):
    """`c` is `files` prepared as documented: by file (each split in relative-path order) or,
    when that leaves a split empty, the whole stream with validation its tail."""
    order = sorted(files)
    if c.manifest["split_by"] == "file":
        assert c.train.tobytes() == _stream(files, [r for r in order
                                                    if not text_module.is_validation(r, fraction)])
        assert c.validation.tobytes() == _stream(files, [r for r in order
                                                         if text_module.is_validation(r, fraction)])
    else:
        assert c.train.tobytes() + c.validation.tobytes() == _stream(files, order)


def _take(it, k):
    return [next(it) for _ in range(k)]


# --- which files ---------------------------------------------------------------------------------


def test_the_stdlib_corpus_is_the_interpreters_own_py_files_in_one_fixed_order():
    root = text_module.stdlib_root()
    files = text_module.stdlib_files()
    assert len(files) > 100
    assert files == text_module.stdlib_files()  # deterministic
    relatives = [f.relative_to(root).as_posix() for f in files]
    assert relatives == sorted(relatives)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"site-packages", "dist-packages", "__pycache__"}
    assert not parts & {"test", "tests", "idle_test"}  # tests differ between installs
    with_tests = text_module.stdlib_files(include_tests=True)
    assert set(files) <= set(with_tests)
    assert not {p for f in with_tests for p in f.relative_to(root).parts} & {"site-packages"}
    assert text_module.text_files(None) == files  # no patterns: the standard library


def test_a_pattern_that_matches_nothing_is_a_usage_error_naming_it(tmp_path):
    _write(tmp_path, {"a.txt": b"a"})
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(UsageError, match="nowhere") as info:
        text_module.text_files([str(tmp_path / "a.txt"), missing])
    assert repr(missing) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"\*\.rst"):
        text_module.text_files(str(tmp_path / "*.rst"))


def test_directories_expand_to_every_file_below_and_files_are_listed_once_sorted(corpus):
    root, paths, _ = corpus
    every = sorted(p.resolve() for p in paths)
    assert text_module.text_files(str(root)) == every  # one str, a directory
    assert text_module.text_files(root) == every  # a Path
    overlapping = [str(root / "b"), str(root / "b" / "*.txt"), str(root / "b" / "one.txt"),
                   str(root / "**" / "*.py"), str(root / "c" / ".." / "a.txt")]
    got = text_module.text_files(overlapping)
    assert len(got) == len(set(got))
    assert got == sorted(got, key=str)
    assert [p.relative_to(root.resolve()).as_posix() for p in got] == [
        "a.txt", "b/one.txt", "b/three.txt", "b/two.txt", "c/d/deep.py"]
    assert all(p.is_absolute() for p in got)


# --- the validation split ------------------------------------------------------------------------


def test_the_validation_split_of_a_path_is_stable_and_follows_the_fraction():
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    first = [text_module.is_validation(n, 0.1) for n in names]
    assert first == [text_module.is_validation(n, 0.1) for n in reversed(names)][::-1]
    assert 100 < sum(first) < 300  # about a tenth
    assert not any(text_module.is_validation(n, 0.0) for n in names)
    assert all(text_module.is_validation(n, 1.0) for n in names)
    # a larger fraction only adds files to validation
    assert all(text_module.is_validation(n, 0.5) for n, v in zip(names, first) if v)


@pytest.mark.parametrize("fraction", [-0.01, 1.5, math.nan])
def test_a_validation_fraction_outside_zero_to_one_is_a_usage_error(fraction):
    with pytest.raises(UsageError, match="fraction"):
        text_module.is_validation("a.py", fraction)


# --- preparing -----------------------------------------------------------------------------------


def test_the_splits_are_each_files_bytes_and_a_zero_in_relative_path_order(corpus):
    root, paths, cache = corpus
    fraction = 0.3  # with these names, both splits get files
    c = _prepare(reversed(paths), cache, validation_fraction=fraction)
    order = sorted(FILES)
    assert c.files == tuple(order)
    val = [r for r in order if text_module.is_validation(r, fraction)]
    train = [r for r in order if not text_module.is_validation(r, fraction)]
    assert val and train, "pick a corpus that both splits get files of"
    assert c.manifest["split_by"] == "file"
    assert c.train.dtype == c.validation.dtype == np.uint8
    assert c.train.tobytes() == _stream(FILES, train)
    assert c.validation.tobytes() == _stream(FILES, val)
    assert c.directory == cache / c.key
    assert (c.directory / "manifest.json").exists()
    assert _leftovers(cache) == []


def test_a_corpus_too_small_to_split_by_file_takes_validation_from_the_tail(tmp_path):
    files = {"only.txt": b"0123456789" * 10}  # 100 bytes + 1 separator
    c = _prepare(_write(tmp_path / "one", files), tmp_path / "cache", validation_fraction=0.1)
    assert c.manifest["split_by"] == "tail"
    stream = _stream(files, ["only.txt"])
    assert c.train.tobytes() + c.validation.tobytes() == stream
    assert len(c.validation) == round(len(stream) * 0.1)
    # no validation at all: everything is training data
    c0 = _prepare(_write(tmp_path / "one", files), tmp_path / "cache", validation_fraction=0.0)
    assert c0.train.tobytes() == stream and len(c0.validation) == 0
    assert c0.key != c.key  # the fraction is part of the key


def test_a_prepared_corpus_is_found_again_without_reading_or_rewriting_it(corpus, monkeypatch,
                                                                           capsys):
    root, paths, cache = corpus
    first = _prepare(paths, cache)
    npy = first.directory / "train.npy"
    mtime = npy.stat().st_mtime_ns

    def no_reads(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(text_module, "_read_bytes", no_reads)
    again = text_module.prepare_tokens(paths, cache, progress=True)
    assert capsys.readouterr().out.startswith("cached text: 8 files")
    assert again.key == first.key and again.directory == first.directory
    assert npy.stat().st_mtime_ns == mtime
    assert again.train.tobytes() == first.train.tobytes()
    assert again.validation.tobytes() == first.validation.tobytes()
    assert sorted(p.name for p in cache.iterdir()) == [first.key]


def test_a_changed_file_is_prepared_again_under_a_new_key(corpus):
    root, paths, cache = corpus
    before = _prepare(paths, cache, validation_fraction=0.0)
    (root / "a.txt").write_bytes(b"a new, longer first file\n")  # other size
    grown = _prepare(paths, cache, validation_fraction=0.0)
    assert grown.key != before.key
    assert grown.train.tobytes().startswith(b"a new, longer first file\n\0")
    # same size, other bytes: seen through the mtime
    same_size = b"M" * len(FILES["m.txt"])
    stat = (root / "m.txt").stat()
    (root / "m.txt").write_bytes(same_size)
    os.utime(root / "m.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = _prepare(paths, cache, validation_fraction=0.0)
    assert touched.key not in (before.key, grown.key)
    assert same_size + b"\0" in touched.train.tobytes()
    assert FILES["m.txt"] not in touched.train.tobytes()
    # the old preparations stay as they were (another job may still map them)
    assert before.train.tobytes() == _stream(FILES, sorted(FILES))


@pytest.mark.parametrize("crash", [OSError("disk gone"), KeyboardInterrupt()],
                         ids=["read-error", "interrupt"])
def test_a_crash_while_preparing_leaves_nothing_that_a_later_run_would_read(corpus, monkeypatch,
                                                                            crash):
    root, paths, cache = corpus
    reads = []

    def read_then_crash(path):
        reads.append(path)
        if len(reads) == 2:
            raise crash
        return path.read_bytes()

    monkeypatch.setattr(text_module, "_read_bytes", read_then_crash)
    expected = DataError if isinstance(crash, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        _prepare(paths, cache)
    assert len(reads) == 2
    assert list(cache.iterdir()) == []  # no keyed dir, no .tmp-* dir
    monkeypatch.undo()
    c = _prepare(paths, cache)
    _assert_holds(c, FILES)
    assert sorted(p.name for p in cache.iterdir()) == [c.key]


def test_a_half_written_shard_is_never_read(corpus, tmp_path):
    root, paths, cache = corpus
    key = _prepare(paths, tmp_path / "elsewhere").key  # the key does not depend on the cache
    stale = cache / key
    stale.mkdir(parents=True)
    (stale / "train.npy").write_bytes(b"\x93NUMPY trunc")  # no manifest.json: not prepared
    c = _prepare(paths, cache)
    assert c.key == key and c.directory == stale
    assert (stale / "manifest.json").exists()
    _assert_holds(c, FILES)
    assert sorted(p.name for p in cache.iterdir()) == [key]  # replaced, nothing left aside
    _assert_holds(_prepare(paths, cache), FILES)  # and found again


def test_processes_preparing_at_once_end_up_with_the_one_dir(corpus, monkeypatch):
    root, paths, cache = corpus
    winner = _prepare(paths, cache)
    real = text_module._read_manifest
    looks = []

    def not_yet_the_first_time(directory):  # this process looked before the other one finished
        looks.append(directory)
        return None if len(looks) == 1 else real(directory)

    monkeypatch.setattr(text_module, "_read_manifest", not_yet_the_first_time)
    late = _prepare(paths, cache)
    assert late.key == winner.key and late.directory == winner.directory
    assert late.train.tobytes() == winner.train.tobytes()
    assert sorted(p.name for p in cache.iterdir()) == [winner.key]


def test_no_files_or_a_file_outside_the_root_is_a_usage_error(corpus, tmp_path):
    root, paths, cache = corpus
    with pytest.raises(UsageError, match="no text files"):
        _prepare([], cache)
    with pytest.raises(UsageError, match="not under the corpus root"):
        _prepare(paths, cache, root=root / "b")
    with pytest.raises(DataError, match="cannot be read"):
        _prepare([root / "missing.txt"], cache)


def test_load_text_prepares_the_users_files(corpus):
    root, paths, cache = corpus
    c = data.load_text([str(root)], cache, validation_fraction=0.0, progress=False)
    assert isinstance(c, data.TokenCorpus)
    assert c.files == tuple(sorted(FILES)) and c.name == "text"
    assert c.train.tobytes() == _stream(FILES, sorted(FILES))


# --- token windows as a dataset ------------------------------------------------------------------


def test_example_i_is_the_window_at_i_times_seq_len_and_its_shift_by_one():
    tokens = np.random.default_rng(0).integers(0, 256, 10 * 8 + 1, dtype=np.uint8)
    ds = data.from_tokens(tokens, seq_len=8, global_batch=4)
    assert len(ds) == 10
    for i in range(10):
        inputs, targets = ds.source[i]
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(inputs, tokens[i * 8:i * 8 + 8])
        np.testing.assert_array_equal(targets, tokens[i * 8 + 1:i * 8 + 9])
    with pytest.raises(IndexError):
        ds.source[10]
    assert len(data.from_tokens(tokens[:-1], seq_len=8, global_batch=4)) == 9  # needs +1


def test_batches_are_windows_and_global_batch_k_depends_only_on_seed_and_k():
    tokens = np.arange(40 * 5 + 1, dtype=np.int64)  # a token's value is its position
    L, B = 5, 6

    def run(seed=1, start=0, k=10, **kw):
        return _take(data.from_tokens(tokens, seq_len=L, global_batch=B, seed=seed,
                                      **kw).batches(start_step=start), k)

    one = run(process_index=0, process_count=1)
    for inputs, targets in one:
        assert inputs.shape == targets.shape == (B, L) and inputs.dtype == np.int32
        assert np.all(inputs[:, 0] % L == 0)
        np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(L))
        np.testing.assert_array_equal(targets, inputs + 1)
    again = run(process_index=0, process_count=1)
    halves = [run(process_index=p, process_count=2) for p in range(2)]
    resumed = run(start=7, k=3, process_index=0, process_count=1)
    for k in range(10):
        np.testing.assert_array_equal(again[k][0], one[k][0])
        assert halves[0][k][0].shape == (B // 2, L)
        for part in (0, 1):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][k][part], halves[1][k][part]]), one[k][part])
    for a, b in zip(resumed, one[7:]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    other_seed = run(seed=2, process_index=0, process_count=1)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(other_seed, one))


def test_too_few_tokens_for_one_window_is_a_usage_error():
    with pytest.raises(UsageError, match="too few"):
        data.from_tokens(np.zeros(8, np.uint8), seq_len=8, global_batch=1)
    with pytest.raises(UsageError, match="seq_len"):
        data.from_tokens(np.zeros(8, np.uint8), seq_len=0, global_batch=1)
    assert len(data.from_tokens(np.zeros(9, np.uint8), seq_len=8, global_batch=1)) == 1


def test_a_corpus_dataset_is_named_by_its_content_so_other_text_has_another_name(tmp_path):
    a = _prepare(_write(tmp_path / "a", FILES), tmp_path / "cache", validation_fraction=0.5)
    changed = dict(FILES, **{"a.txt": b"other text entirely\n"})
    b = _prepare(_write(tmp_path / "b", changed), tmp_path / "cache", validation_fraction=0.5)
    kw = dict(seq_len=4, global_batch=2, process_index=0, process_count=1)
    train_a, train_b = a.dataset("train", **kw), b.dataset("train", **kw)
    assert a.manifest["train"]["sha256"][:12] in train_a.name
    assert train_a.name.startswith("text-") and train_a.name.endswith("/train")
    assert train_a.name != train_b.name
    assert train_a.meta["data"] == train_a.name
    assert a.dataset("validation", **kw).name != train_a.name
    # the same content in another place is the same data
    c = _prepare(_write(tmp_path / "c", FILES), tmp_path / "cache", validation_fraction=0.5)
    assert c.dataset("train", **kw).name == train_a.name
    inputs, targets = next(train_a.batches())
    assert inputs.shape == (2, 4) and inputs.dtype == np.int32
    with pytest.raises(UsageError, match="test"):
        a.dataset("test", **kw)
