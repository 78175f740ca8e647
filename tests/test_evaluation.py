"""Fréchet distance against scipy's sqrtm, and the digits evaluator."""
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from kindjax.data.digits import load_digits, split_train_test
from kindjax.evaluation import DigitsEvaluator, feature_statistics, frechet_distance
from kindjax.evaluation.digits_evaluator import TEST_FRACTION

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("evaluation")


def _random_covariance(rng: np.random.Generator, dim: int, rank: int) -> np.ndarray:
    factor = rng.normal(size=(dim, rank)) * rng.uniform(0.2, 3.0, size=rank)
    return factor @ factor.T


def _sqrtm_oracle(mu1, sigma1, mu2, sigma2) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products
        root = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank1, rank2", [(12, 12), (4, 12), (12, 1), (3, 5)])
def test_frechet_distance_matches_sqrtm(seed, rank1, rank2):
    rng = np.random.default_rng(seed)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1 = _random_covariance(rng, dim, rank1)
    sigma2 = _random_covariance(rng, dim, rank2)
    expected = _sqrtm_oracle(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(frechet_distance(mu1, sigma1, mu2, sigma2), expected, rtol=1e-6)
    np.testing.assert_allclose(frechet_distance(mu2, sigma2, mu1, sigma1), expected, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [9, 2])
def test_frechet_distance_of_a_gaussian_to_itself_is_zero(seed, rank):
    rng = np.random.default_rng(seed)
    mu, sigma = rng.normal(size=9), _random_covariance(rng, 9, rank)
    # Same Σ: only ‖Δμ‖² = 9 · 0.5² remains (up to round-off on the scale of Tr Σ).
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu + 0.5, sigma) - 2.25) < 1e-8 * np.trace(sigma)


def test_feature_statistics_is_mean_and_unbiased_covariance():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    mu, sigma = feature_statistics(features)
    centred = features - features.sum(axis=0) / 40
    np.testing.assert_allclose(mu, features.sum(axis=0) / 40, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 39, rtol=1e-10)
    with pytest.raises(ValueError):
        feature_statistics(features[:1])


@pytest.fixture(scope="module")
def evaluator() -> DigitsEvaluator:
    return DigitsEvaluator.train(seed=0)


@pytest.fixture(scope="module")
def held_out():
    return split_train_test(load_digits(), seed=0, test_fraction=TEST_FRACTION)[1]


def test_held_out_accuracy(evaluator, held_out):
    accuracy = np.mean(evaluator.predict(held_out.images) == held_out.labels)
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(evaluator.held_out_accuracy)
    assert evaluator.classes == tuple(range(10))


def test_robust_to_noisy_and_blurry_digits(evaluator, held_out):
    rng = np.random.default_rng(1)
    x = held_out.images
    neighbours = np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)
    blurred = 0.6 * x + 0.1 * neighbours
    noisy = blurred + 0.2 * rng.normal(size=x.shape)
    assert np.mean(evaluator.predict(noisy) == held_out.labels) >= 0.9


def test_probabilities_and_predict_agree(evaluator, held_out):
    probs = evaluator.probabilities(held_out.images[:50])
    assert probs.shape == (50, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    np.testing.assert_array_equal(probs.argmax(axis=1), evaluator.predict(held_out.images[:50]))
    assert evaluator.features(held_out.images[:50]).shape[0] == 50


def test_real_halves_are_much_closer_than_real_and_noise(evaluator):
    data = load_digits()
    order = np.random.default_rng(2).permutation(len(data))
    half_a, half_b = data.images[order[::2]], data.images[order[1::2]]
    noise = np.random.default_rng(3).uniform(-1, 1, size=half_a.shape)
    stats_a = feature_statistics(evaluator.features(half_a))
    real_real = frechet_distance(*stats_a, *feature_statistics(evaluator.features(half_b)))
    real_noise = frechet_distance(*stats_a, *feature_statistics(evaluator.features(noise)))
    assert real_real * 20 < real_noise


def test_evaluate_compares_with_real_digits_of_the_same_classes(evaluator):
    data = load_digits()
    low = data.labels < 7
    rng = np.random.default_rng(4)
    samples = data.images[low] + 0.05 * rng.normal(size=data.images[low].shape)
    right = evaluator.evaluate(samples, data.labels[low])
    assert right["sample_accuracy"] >= 0.95
    wrong = evaluator.evaluate(samples, (data.labels[low] % 3) + 7)  # claims digits 7-9
    assert wrong["sample_accuracy"] < 0.2
    assert right["frechet_distance"] * 5 < wrong["frechet_distance"]
    with pytest.raises(ValueError):
        evaluator.evaluate(samples, data.labels[low] + 10)


def test_training_is_deterministic(evaluator):
    again = DigitsEvaluator.train(seed=0)
    leaves, again_leaves = jax.tree.leaves(evaluator.params), jax.tree.leaves(again.params)
    assert len(leaves) == len(again_leaves) == 6
    for a, b in zip(leaves, again_leaves):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 12 s (-n 2, 2 cores)
def test_class_subset_evaluator_uses_subset_labels():
    sub = DigitsEvaluator.train(seed=1, classes=(8, 3))
    assert sub.classes == (8, 3) and sub.probabilities(load_digits().images[:3]).shape == (3, 2)
    data = load_digits()
    eights, threes = data.images[data.labels == 8], data.images[data.labels == 3]
    assert np.mean(sub.predict(eights) == 0) > 0.95
    assert np.mean(sub.predict(threes) == 1) > 0.95


def test_normalized_prediction_entropy_matches_numpy(evaluator):
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, size=(64, 8, 8, 1))
    classes = [7, 2, 5]
    p = scipy.special.softmax(evaluator.logits(images)[:, classes], axis=1)
    expected = np.mean(scipy.stats.entropy(p, axis=1)) / np.log(3)
    value = evaluator.normalized_prediction_entropy(images, classes)
    assert value == pytest.approx(expected, rel=1e-9)
    assert 0.0 < value < 1.0
    with pytest.raises(ValueError):
        evaluator.normalized_prediction_entropy(images, [4])


def test_normalized_prediction_entropy_hand_value(evaluator):
    # A head with zero kernel and bias (0, ·, ·, log 3, …) gives p = (1/4, 3/4) on classes (0, 3):
    # H = −(¼ ln ¼ + ¾ ln ¾), normalised by ln 2 → 0.8112781244591328.
    params = jax.tree.map(np.array, evaluator.params)
    head = params["params"]["Dense_2"]
    head["kernel"] = np.zeros_like(head["kernel"])
    head["bias"] = np.random.default_rng(6).normal(size=head["bias"].shape)
    head["bias"][0], head["bias"][3] = 0.0, np.log(3.0)
    fixed = DigitsEvaluator(params=params, classes=evaluator.classes, held_out_accuracy=0.0,
                            reference_features=evaluator.reference_features,
                            reference_labels=evaluator.reference_labels)
    images = np.random.default_rng(8).uniform(-1, 1, size=(16, 8, 8, 1))
    value = fixed.normalized_prediction_entropy(images, [0, 3])
    assert value == pytest.approx(0.8112781244591328, rel=1e-6)


def test_class_distribution_entropy(evaluator):
    digits = load_digits()
    ones = digits.images[digits.labels == 1][:40]
    twos = digits.images[digits.labels == 2][:40]
    sevens = digits.images[digits.labels == 7][:20]
    # Real digits are classified correctly, so the predicted-class distribution over
    # (1, 2, 7) is (40, 40, 20)/100: H = -Σ q log q / log 3.
    q = np.array([0.4, 0.4, 0.2])
    expected = -np.sum(q * np.log(q)) / np.log(3)
    images = np.concatenate([ones, twos, sevens])
    assert evaluator.class_distribution_entropy(images, (1, 2, 7)) == pytest.approx(expected, abs=0.02)
    assert evaluator.class_distribution_entropy(ones, (1, 2, 7)) == pytest.approx(0.0, abs=0.05)
