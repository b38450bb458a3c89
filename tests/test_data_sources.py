"""Any dataset through `jaxdist.data`: arrays, a TFDS dataset by name, a grain source. Global
batch k depends only on (seed, k), each process reads only its rows, any step resumes exactly,
nothing has to fit in memory, and a damaged dataset is a one-line error naming the file."""

import shutil

import numpy as np
import pytest

from conftest import SHARED_TFDS
from jaxdist import data
from jaxdist.errors import DataError, UsageError


def _arrays(n=100):
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3), np.arange(n, dtype=np.int32)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_global_batch_k_is_the_same_whatever_the_process_count_and_the_start_step():
    x, y = _arrays()
    one = _take(data.from_arrays((x, y), global_batch=20, seed=3).batches(), 12)
    halves = [_take(data.from_arrays((x, y), global_batch=20, seed=3, process_index=p,
                                     process_count=2).batches(), 12) for p in range(2)]
    for k in range(12):
        np.testing.assert_array_equal(np.concatenate([halves[0][k][1], halves[1][k][1]]),
                                      one[k][1])
        np.testing.assert_array_equal(one[k][0], x[one[k][1]])  # rows stay together
    resumed = _take(data.from_arrays((x, y), global_batch=20, seed=3).batches(start_step=7), 5)
    for a, b in zip(resumed, one[7:]):
        np.testing.assert_array_equal(a[1], b[1])


def test_every_example_appears_once_per_epoch_and_epochs_differ():
    x, y = _arrays()
    labels = np.concatenate([b[1] for b in _take(
        data.from_arrays((x, y), global_batch=25, seed=0).batches(), 8)])
    first, second = labels[:100], labels[100:]
    assert sorted(first) == sorted(second) == list(range(100))
    assert not np.array_equal(first, second)


def test_a_per_example_map_runs_on_the_worker_threads_and_dicts_work():
    x, y = _arrays()
    ds = data.from_arrays({"x": x, "y": y}, global_batch=10, seed=1,
                          map=lambda ex: {"x": ex["x"] * 2, "y": ex["y"]})
    batch = next(ds.batches())
    np.testing.assert_array_equal(batch["x"], x[batch["y"]] * 2)


class Squares:
    """A source that holds nothing in memory: example i is computed when read."""

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        return np.array([i, i * i], np.int64)


def test_any_random_access_source_streams_without_loading_it_whole():
    ds = data.from_source(Squares(), global_batch=8, seed=0)
    batch = next(ds.batches(start_step=10**6))
    np.testing.assert_array_equal(batch[:, 1], batch[:, 0] ** 2)
    assert ds.meta["examples"] == 10**9


def test_eval_batches_cover_the_examples_in_order_with_padding_masked():
    x, y = _arrays(25)
    got = list(data.from_arrays((x, y), global_batch=10).eval_batches())
    assert [m.sum() for _, m in got] == [10, 10, 5]
    labels = np.concatenate([b[1][m > 0] for b, m in got])
    np.testing.assert_array_equal(labels, y)


def test_bad_arrays_are_clear_errors():
    x, y = _arrays()
    with pytest.raises(UsageError, match="different lengths"):
        data.from_arrays((x, y[:50]), global_batch=10)
    with pytest.raises(UsageError, match="does not divide over 3 processes"):
        data.from_arrays((x, y), global_batch=10, process_index=0, process_count=3)


def test_a_tfds_dataset_by_name_reads_the_same_examples_as_the_decoded_split(mnist):
    train, _ = mnist
    ds = data.from_tfds("mnist", "train", global_batch=16, seed=5,
                        map=lambda ex: (ex["image"], ex["label"]))
    arrays = data.from_arrays((train.images, train.labels), global_batch=16, seed=5)
    for (images, labels), (want_images, want_labels) in zip(_take(ds.batches(3), 2),
                                                            _take(arrays.batches(3), 2)):
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)


@pytest.fixture
def damaged_copy(mnist, tmp_path):
    if not SHARED_TFDS.exists():
        pytest.skip("needs ../shared/data/tensorflow_datasets to copy")
    shutil.copytree(SHARED_TFDS / "mnist", tmp_path / "mnist")
    for p in (tmp_path / "mnist").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return tmp_path, next((tmp_path / "mnist").glob("*/"))


def test_a_truncated_record_file_is_one_line_naming_it(damaged_copy):
    root, version = damaged_copy
    record = next(version.glob("mnist-test.array_record*"))
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    with pytest.raises(DataError) as info:
        next(data.from_tfds("mnist", "test", global_batch=8, data_dir=str(root)).batches())
    message = str(info.value)
    assert str(record) in message and "\n" not in message
    with pytest.raises(DataError, match="cannot be read"):
        data.load_split("mnist", "test", str(root), cache_dir=root / "cache", progress=False)


def test_a_garbled_dataset_info_is_one_line_naming_it_and_the_experiment_exits_2(
        damaged_copy, capsys):
    root, version = damaged_copy
    (version / "dataset_info.json").write_text("{garbled")
    with pytest.raises(DataError) as info:
        data.from_tfds("mnist", "test", global_batch=8, data_dir=str(root))
    assert str(version / "dataset_info.json") in str(info.value)
    from experiments import mnist as experiment

    assert experiment.main(["--data_dir", str(root), "--progress", "false",
                            "--compile_cache", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset_info.json" in err


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4099])
def test_the_memoryless_epoch_order_of_huge_datasets_is_a_permutation(n):
    from jaxdist.data.pipeline import feistel_permutation

    order = feistel_permutation(np.arange(n), n, (0, 1))
    assert sorted(order) == list(range(n))
    assert n < 7 or not np.array_equal(order, feistel_permutation(np.arange(n), n, (0, 2)))
