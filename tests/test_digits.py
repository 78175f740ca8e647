"""The embedded digits, the resumable batching rule, class subsets and the split."""
import numpy as np
import pytest

from kindjax.data.digits import load_digits, split_train_test
from kindjax.data.pipeline import ArrayDataset, subset

DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _random_dataset(n: int = 37, num_classes: int = 4, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(
        images=rng.uniform(-1, 1, size=(n, 3, 3, 2)).astype(np.float32),
        labels=rng.integers(0, num_classes, size=n).astype(np.int32),
        num_classes=num_classes,
        class_names=tuple(f"c{i}" for i in range(num_classes)),
    )


def test_load_digits_matches_the_known_data_set():
    data = load_digits()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.float32
    assert data.labels.dtype == np.int32
    assert np.bincount(data.labels).tolist() == DIGIT_COUNTS
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    raw = (data.images + 1.0) * 8.0
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-5)
    # Mean intensity of a '0' is well above that of a '1' (a ring vs a stroke).
    assert data.images[data.labels == 0].mean() > data.images[data.labels == 1].mean()


def test_load_digits_with_classes_relabels_in_given_order():
    full = load_digits()
    part = load_digits(classes=(9, 2))
    assert part.num_classes == 2 and part.class_names == ("9", "2")
    np.testing.assert_array_equal(part.images[part.labels == 0], full.images[full.labels == 9])
    np.testing.assert_array_equal(part.images[part.labels == 1], full.images[full.labels == 2])
    assert len(part) == DIGIT_COUNTS[9] + DIGIT_COUNTS[2]


@pytest.mark.parametrize("batch_size", [5, 37, 50])
def test_batches_follow_the_per_epoch_permutation_stream(batch_size):
    data = _random_dataset()
    seed, n = 3, len(data)
    num_steps = 3 * n // batch_size + 2
    stream = np.concatenate([np.random.default_rng((seed, e)).permutation(n)
                             for e in range(num_steps * batch_size // n + 1)])
    for step in range(num_steps):
        batch = data.batch(step, batch_size, seed)
        expected = stream[step * batch_size:(step + 1) * batch_size]
        np.testing.assert_array_equal(batch["image"], data.images[expected])
        np.testing.assert_array_equal(batch["label"], data.labels[expected])


def test_every_example_once_per_epoch_and_epochs_differ():
    data = _random_dataset()
    n, batch_size, seed = len(data), 8, 11
    steps = range(2 * n // batch_size + 1)
    drawn = np.concatenate([data.indices(s, batch_size, seed) for s in steps])
    first, second = drawn[:n], drawn[n:2 * n]
    assert sorted(first.tolist()) == list(range(n))
    assert sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)


def test_batch_is_a_pure_function_of_seed_and_step():
    step, batch_size = 9, 6
    fresh = _random_dataset().batch(step, batch_size, seed=5)
    data = _random_dataset()
    for s in range(step):
        data.batch(s, batch_size, seed=5)
    resumed = data.batch(step, batch_size, seed=5)
    np.testing.assert_array_equal(fresh["image"], resumed["image"])
    np.testing.assert_array_equal(fresh["label"], resumed["label"])
    other_seed = data.batch(step, batch_size, seed=6)
    assert not np.array_equal(fresh["image"], other_seed["image"])


def test_batch_rejects_bad_arguments():
    data = _random_dataset()
    with pytest.raises(ValueError):
        data.batch(-1, 4, 0)
    with pytest.raises(ValueError):
        data.batch(0, 0, 0)


def test_subset_relabels_and_names_follow():
    data = _random_dataset(n=200, num_classes=5)
    part = subset(data, [3, 0])
    assert part.num_classes == 2 and part.class_names == ("c3", "c0")
    assert len(part) == np.sum(data.labels == 3) + np.sum(data.labels == 0)
    np.testing.assert_array_equal(part.images[part.labels == 0], data.images[data.labels == 3])
    np.testing.assert_array_equal(part.images[part.labels == 1], data.images[data.labels == 0])
    assert part.labels.dtype == np.int32


@pytest.mark.parametrize("classes, message", [([1, 5], "out of range"), ([-1], "out of range"),
                                              ([2, 1, 2], "repeated"), ([], "at least one")])
def test_subset_errors(classes, message):
    with pytest.raises(ValueError, match=message):
        subset(_random_dataset(num_classes=5), classes)


def _sorted_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_split_is_stratified_deterministic_and_a_partition():
    data = load_digits()
    train, test = split_train_test(data, seed=4, test_fraction=0.25)
    expected_counts = [round(0.25 * c) for c in DIGIT_COUNTS]
    assert np.bincount(test.labels, minlength=10).tolist() == expected_counts
    np.testing.assert_array_equal(
        _sorted_rows(np.concatenate([train.images, test.images]),
                     np.concatenate([train.labels, test.labels])),
        _sorted_rows(data.images, data.labels))
    again = split_train_test(data, seed=4, test_fraction=0.25)[1]
    np.testing.assert_array_equal(again.images, test.images)
    other = split_train_test(data, seed=5, test_fraction=0.25)[1]
    assert not np.array_equal(other.images, test.images)
    with pytest.raises(ValueError):
        split_train_test(data, seed=0, test_fraction=1.0)


def test_embedded_digits_equal_scikit_learns():
    from sklearn.datasets import load_digits as sklearn_digits

    reference = sklearn_digits()
    data = load_digits()
    np.testing.assert_array_equal(data.labels, reference.target)
    np.testing.assert_array_equal(data.images[..., 0], reference.images / 8.0 - 1.0)
