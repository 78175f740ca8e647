"""A small classifier of the real 8×8 digits, used to score generated digits.

Labels: an evaluator trained with ``classes = C`` (default: all ten digits, C = (0..9))
predicts label ``j`` for digit ``C[j]``, exactly the relabelling of
``load_digits(classes=C)``. With the default evaluator, label = digit id; samples of a
model trained on ``load_digits(classes=C)`` (labels 0..k−1) are scored with
``evaluate(images, np.asarray(C)[labels])``.

The classifier is an MLP ``64 → 256 → F`` (GELU) whose F-dim activations are the
features, then a linear head to ``len(C)`` logits. It is trained with Adam on a
stratified train split, on inputs ``x̃ = (1 − β)·x + β·blur(x) + s·ε`` (β ~ U(0, 0.5),
s ~ U(0, 0.3), ε ~ N(0, I)) so that slightly blurry or noisy samples are still read.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kindjax.data.digits import load_digits, split_train_test
from kindjax.evaluation.frechet import feature_statistics, frechet_distance

FEATURE_DIM = 64
HIDDEN_DIM = 256
TRAIN_STEPS = 2000
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
MAX_BLUR = 0.5
MAX_NOISE = 0.3
TEST_FRACTION = 0.2


class _DigitsMLP(nn.Module):
    """``h = gelu(W2 · gelu(W1 · x))`` (features), ``logits = W3 · h``."""

    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images.reshape(images.shape[0], -1)
        x = nn.gelu(nn.Dense(HIDDEN_DIM)(x))
        features = nn.gelu(nn.Dense(FEATURE_DIM)(x))
        return nn.Dense(self.num_classes)(features), features


def _blur(images: jax.Array) -> jax.Array:
    """3×3 binomial blur ``[1, 2, 1]ᵀ[1, 2, 1] / 16`` with edge padding, on (N, H, W, 1)."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


def _augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """``(1 − β)·x + β·blur(x) + s·ε`` with per-image β ~ U(0, MAX_BLUR), s ~ U(0, MAX_NOISE)."""
    k_blur, k_scale, k_noise = jax.random.split(key, 3)
    shape = (images.shape[0], 1, 1, 1)
    beta = jax.random.uniform(k_blur, shape, maxval=MAX_BLUR)
    scale = jax.random.uniform(k_scale, shape, maxval=MAX_NOISE)
    noise = jax.random.normal(k_noise, images.shape)
    return (1 - beta) * images + beta * _blur(images) + scale * noise


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int):
    """Adam on the mean cross-entropy of augmented random minibatches; returns params."""
    model = _DigitsMLP(num_classes)
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init, images[:1])
    optimizer = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, TRAIN_STEPS))

    def loss_fn(params, x, y):
        logits, _ = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, step_key):
        params, opt_state = carry
        k_idx, k_aug = jax.random.split(step_key)
        idx = jax.random.randint(k_idx, (BATCH_SIZE,), 0, images.shape[0])
        grads = jax.grad(loss_fn)(params, _augment(k_aug, images[idx]), labels[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  jax.random.split(k_train, TRAIN_STEPS))
    return params


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _apply(params, images: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    return _DigitsMLP(num_classes).apply(params, images)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log p_i = z_i − max z − log Σ_j exp(z_j − max z)`` along the last axis, float64."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsOutputs:
    """The ``digits`` need of a metric (:mod:`kindjax.evaluation.metric`): the classifier's ``logits``
    and ``features`` of the samples, their evaluator ``labels``, and ``reference``: the features of
    the real digits of those labels."""

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    reference: np.ndarray

    def accuracy(self) -> float:
        """``mean[argmax logits = labels]``."""
        return float(np.mean(np.argmax(self.logits, axis=-1) == self.labels))

    def frechet_distance(self) -> float:
        """Fréchet distance between the samples' features and the real digits' (:mod:`.frechet`)."""
        return frechet_distance(*feature_statistics(self.features), *feature_statistics(self.reference))


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsEvaluator:
    """Trained classifier parameters plus the features of all real digits of ``classes``
    (train and test split), the reference set of :meth:`evaluate`.

    ``classes[j]`` is the digit id of label ``j``; ``held_out_accuracy`` is measured on
    the stratified test split (``TEST_FRACTION``) that training did not see.
    """

    params: dict
    classes: tuple[int, ...]
    held_out_accuracy: float
    reference_features: np.ndarray
    reference_labels: np.ndarray

    @classmethod
    def train(cls, seed: int = 0, classes: Sequence[int] = ()) -> DigitsEvaluator:
        """Train on the train split of ``load_digits(classes)`` (split and init from ``seed``)."""
        classes = tuple(int(c) for c in classes) or tuple(range(10))
        real = load_digits(classes)
        train_set, test_set = split_train_test(real, seed=seed, test_fraction=TEST_FRACTION)
        params = _fit(jax.random.key(seed), jnp.asarray(train_set.images),
                      jnp.asarray(train_set.labels), len(classes))
        params = jax.device_get(params)
        test_logits, _ = _apply(params, jnp.asarray(test_set.images), len(classes))
        accuracy = float(np.mean(np.argmax(np.asarray(test_logits), axis=-1) == test_set.labels))
        _, real_features = _apply(params, jnp.asarray(real.images), len(classes))
        return cls(params=params, classes=classes, held_out_accuracy=accuracy,
                   reference_features=np.asarray(real_features, dtype=np.float64),
                   reference_labels=real.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if images.shape[1:] not in ((8, 8), (8, 8, 1)):
            raise ValueError(f"expected images of shape (N, 8, 8[, 1]), got {images.shape}")
        logits, features = _apply(self.params, jnp.asarray(images), self.num_classes)
        return np.asarray(logits, dtype=np.float64), np.asarray(features, dtype=np.float64)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Classifier logits ``(N, k)`` of images in [-1, 1], shape (N, 8, 8[, 1])."""
        return self._run(images)[0]

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer activations ``(N, FEATURE_DIM)``."""
        return self._run(images)[1]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``softmax(logits)``, shape ``(N, k)``."""
        return np.exp(_log_softmax(self.logits(images)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``argmax`` label ``(N,)`` (label j means digit ``classes[j]``)."""
        return np.argmax(self.logits(images), axis=-1)

    def outputs(self, images: np.ndarray, labels: np.ndarray) -> DigitsOutputs:
        """The classifier's logits and features of ``images`` (labels ``labels`` of this evaluator),
        and the features of the real digits of the labels present in ``labels``."""
        labels = np.asarray(labels)
        if labels.shape != (np.shape(images)[0],):
            raise ValueError(f"labels shape {labels.shape} does not match images")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        logits, features = self._run(images)
        return DigitsOutputs(logits, features, labels, self.reference_features[np.isin(self.reference_labels, labels)])

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """``sample_accuracy`` and ``frechet_distance`` of ``images`` (:class:`DigitsOutputs`)."""
        out = self.outputs(images, labels)
        return {"sample_accuracy": out.accuracy(), "frechet_distance": out.frechet_distance()}

    def normalized_prediction_entropy(self, images: np.ndarray,
                                      classes: Sequence[int]) -> float:
        """``mean_n H(p_n) / log k`` with ``p_n = softmax(logits_n[classes])``, k = len(classes).

        ``classes`` are labels of this evaluator; 1 = uniform over them, 0 = certain.
        """
        classes = [int(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"need at least two distinct classes, got {classes}")
        if min(classes) < 0 or max(classes) >= self.num_classes:
            raise ValueError(f"classes must lie in 0..{self.num_classes - 1}")
        log_p = _log_softmax(self.logits(images)[:, classes])
        entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)
        return float(np.mean(entropy) / np.log(len(classes)))

    def class_distribution_entropy(self, images: np.ndarray, classes: Sequence[int]) -> float:
        """``H(q) / log k`` of the distribution ``q`` of predicted classes over the samples,
        predictions restricted to ``classes`` (k of them): 1 = samples spread evenly over
        the classes, 0 = every sample predicted as the same class."""
        classes = [int(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"need at least two distinct classes, got {classes}")
        predicted = np.argmax(self.logits(images)[:, classes], axis=-1)
        q = np.bincount(predicted, minlength=len(classes)) / len(predicted)
        q = q[q > 0]
        return float(-np.sum(q * np.log(q)) / np.log(len(classes)))



@functools.lru_cache(maxsize=4)
def evaluator(seed: int = 0) -> DigitsEvaluator:
    """The ten-class evaluator (trained once per process and seed)."""
    return DigitsEvaluator.train(seed=seed)


def digit_ids(classes: Sequence[int], labels: np.ndarray) -> np.ndarray:
    """Model labels of a model trained on ``load_digits(classes)`` → digit ids (``classes[label]``;
    identity when ``classes`` is empty): the labels of :func:`evaluator`."""
    return np.asarray(tuple(classes) or range(10))[labels]


def is_digits_data(config: ml_collections.ConfigDict) -> bool:
    """The config trains on the embedded digits (``data.name="digits"``), which the digits classifier
    reads: its metrics are the default there (:mod:`kindjax.evaluation.metrics`)."""
    return config.data.name == "digits"
