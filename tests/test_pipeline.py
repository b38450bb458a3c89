"""The input pipeline: every example once per epoch, the same global batches for any process count."""

import itertools

import numpy as np
import pytest

from jaxdist import UsageError
from jaxdist.data import ArraySplit
from jaxdist.data.pipeline import eval_batches, train_batches, train_index_batches


def _stream(num_examples, global_batch, seed, steps, process_count=1):
    """Global batches rebuilt from every process's share, in process order."""
    shares = [train_index_batches(num_examples, global_batch, seed, p, process_count)
              for p in range(process_count)]
    return np.stack([np.concatenate([s[k] for s in shares]) for k in range(steps)])


def test_every_example_appears_exactly_once_per_epoch():
    n, b = 1000, 64  # 1000 is not a multiple of 64: batches straddle epochs, nothing is dropped
    flat = _stream(n, b, seed=3, steps=(3 * n) // b + 1).reshape(-1)
    for epoch in range(3):
        assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_each_epoch_is_shuffled_differently_and_reproducibly():
    n = 1000
    flat = _stream(n, 100, seed=1, steps=20).reshape(-1)
    assert not np.array_equal(flat[:n], flat[n:2 * n])
    np.testing.assert_array_equal(flat, _stream(n, 100, seed=1, steps=20).reshape(-1))
    assert not np.array_equal(flat, _stream(n, 100, seed=2, steps=20).reshape(-1))


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_global_batches_do_not_depend_on_the_process_count(process_count):
    one = _stream(6000, 128, seed=0, steps=60)
    many = _stream(6000, 128, seed=0, steps=60, process_count=process_count)
    np.testing.assert_array_equal(one, many)


def test_process_shares_have_no_overlap_and_no_gap():
    shares = [train_index_batches(6000, 128, 0, p, 4)[5] for p in range(4)]
    assert all(len(s) == 32 for s in shares)
    assert len(set(np.concatenate(shares))) == 128


def test_train_batches_gather_images_and_labels_and_resume_at_a_step():
    n = 300
    split = ArraySplit((np.arange(n) % 251).astype(np.uint8).reshape(n, 1, 1, 1),
                       np.arange(n, dtype=np.int32))
    it = train_batches(split, 50, seed=0)
    first = [next(it) for _ in range(4)]
    images, labels = first[0]
    assert images.shape == (50, 1, 1, 1) and labels.shape == (50,)
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels % 251)
    resumed = train_batches(split, 50, seed=0, start_step=3)
    np.testing.assert_array_equal(next(resumed)[1], first[3][1])


def test_eval_batches_cover_the_split_once_with_padding_masked():
    split = ArraySplit(np.zeros((105, 1, 1, 1), np.uint8), np.arange(105, dtype=np.int32))
    seen = []
    for p in range(2):
        for _, labels, mask in eval_batches(split, 20, process_index=p, process_count=2):
            seen.extend(labels[mask > 0])
    assert sorted(seen) == list(range(105))


def test_a_global_batch_that_does_not_divide_over_processes_is_a_usage_error():
    with pytest.raises(UsageError, match="does not divide over 3 processes"):
        train_index_batches(100, 64, 0, 0, 3)


def _augmented(split, steps, start_step=0, process_count=1):
    from jaxdist.data.augment import random_shift

    shares = [train_batches(split, 8, seed=0, start_step=start_step, process_index=p,
                            process_count=process_count, augment=random_shift(2))
              for p in range(process_count)]
    return [np.concatenate([next(s)[0] for s in shares]) for _ in range(steps)]


def test_augmented_batches_are_shifted_copies_and_the_same_for_any_process_count_and_restart():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (40, 28, 28, 1)).astype(np.uint8)
    split = ArraySplit(images=images, labels=np.arange(40, dtype=np.int32))
    one = _augmented(split, 6)
    two = _augmented(split, 6, process_count=2)
    resumed = _augmented(split, 3, start_step=3)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(one[3:], resumed):
        np.testing.assert_array_equal(a, b)
    plain = np.concatenate([b for b, _ in itertools.islice(
        train_batches(split, 8, seed=0), 6)])
    shifted = np.concatenate(one)
    assert shifted.shape == plain.shape and not np.array_equal(shifted, plain)
    # each image is its source moved by at most 2 pixels: the central crop reappears inside it
    for got, src in zip(shifted[:8], plain[:8]):
        center = src[2:-2, 2:-2]
        assert any(np.array_equal(got[dy:dy + 24, dx:dx + 24], center)
                   for dy in range(5) for dx in range(5))
