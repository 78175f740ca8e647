"""The sample metrics of ADM's evaluator (Dhariwal & Nichol 2021, ``guided-diffusion/evaluations``),
on features of :mod:`kindjax.evaluation.inception`, and ADM's ``.npz`` batch format.

- FID: Fréchet distance of Gaussians fitted to ``pool_3`` features (unbiased covariance);
- sFID: the same on the ``spatial`` features (``mixed_6/conv``, first 7 channels, 2023 values);
- Inception Score over consecutive splits of ``split_size`` (5000) samples, the last one possibly
  shorter: ``IS = mean_s exp(mean_{n∈s} KL(p_n ‖ p̄_s))``, ``p_n = softmax(pool_3_n · W)`` (no bias),
  ``p̄_s`` the mean of ``p_n`` over split ``s``;
- precision and recall (Kynkäänniemi et al. 2019, ADM's ``ManifoldEstimator``): the radius of a
  point is its squared Euclidean ``pool_3`` distance to its k-th nearest neighbour (k = 3) in its
  own set, itself excluded. Precision = fraction of samples inside some reference ball
  (``d(r, s) ≤ radius(r)``), recall = fraction of reference points inside some sample ball.
  Distances are computed in blocks, in float32 (ADM uses float16 where it stays finite).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from kindjax.evaluation.frechet import feature_statistics, frechet_distance
from kindjax.io.paths import as_path

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
#: The key under which a statistics or features file kindjax writes records the Inception
#: preprocessing of its features (:data:`kindjax.evaluation.inception.PREPROCESSING`).
PREPROCESS_KEY = "inception_preprocess"
#: The preprocessing of statistics that record none: ADM's reference batches, computed by ADM's
#: TensorFlow evaluator (the TF graph's resize, kindjax's ``"tf1"``).
ADM_PREPROCESS = "tf1"


def recorded_preprocessing(arrays) -> str | None:
    """The preprocessing an ``.npz`` (or a dict of its arrays) records under :data:`PREPROCESS_KEY`; None if none."""
    return str(np.asarray(arrays[PREPROCESS_KEY])) if PREPROCESS_KEY in arrays else None


def check_same_preprocessing(sides: dict[str, str | None]) -> str | None:
    """The one Inception preprocessing of the compared ``sides`` (name → its preprocessing, None:
    unrecorded); ValueError, in one line naming a side of each, if they differ: their features are
    not comparable."""
    first: dict[str | None, str] = {}
    for name, preprocessing in sides.items():
        first.setdefault(preprocessing, name)
    if len(first) > 1:
        listed = ", ".join(f"{name}: {'unrecorded' if p is None else repr(p)}" for p, name in first.items())
        raise ValueError(f"Inception features computed with different preprocessing are not comparable ({listed}); "
                         f"compute every side with the same eval.inception_preprocess")
    return next(iter(first), None)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """``mean_s exp(mean_{n∈s} Σ_c p_nc (log p_nc − log p̄_sc))`` over splits of ``split_size``, float64."""
    log_p = _log_softmax(np.asarray(logits, np.float64))
    if log_p.ndim != 2 or len(log_p) == 0:
        raise ValueError(f"need logits of shape (N >= 1, classes), got {log_p.shape}")
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        p = np.exp(part)
        log_mean = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_mean), axis=1))))
    return float(np.mean(scores))


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """``max(‖a_i‖² − 2 a_i·b_j + ‖b_j‖², 0)``, shape (len(a), len(b))."""
    gram = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(a * a, axis=1)[:, None] - 2.0 * gram + jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _merge_nearest(best: jax.Array, rows: jax.Array, cols: jax.Array, col_valid: jax.Array,
                   k: int) -> jax.Array:
    """The ``k + 1`` smallest distances of each row among ``best`` and this column block."""
    d = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
    block = -jax.lax.top_k(-d, min(k + 1, d.shape[1]))[0]
    return jnp.sort(jnp.concatenate([best, block], axis=1), axis=1)[:, :k + 1]


def _pad(x: np.ndarray, multiple: int, value: float = 0.0) -> np.ndarray:
    extra = -len(x) % multiple
    return np.concatenate([x, np.full((extra,) + x.shape[1:], value, x.dtype)]) if extra else x


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of ``features``, ``(N,)``."""
    features = np.asarray(features, np.float32)
    n = len(features)
    if n <= k:
        raise ValueError(f"the k={k} nearest neighbours need more than {k} points, got {n}")
    batch_size = min(batch_size, n)
    padded = _pad(features, batch_size)
    valid = _pad(np.ones(n, bool), batch_size, False)
    radii = []
    for r in range(0, n, batch_size):
        best = jnp.full((batch_size, k + 1), jnp.inf, jnp.float32)
        for c in range(0, len(padded), batch_size):
            best = _merge_nearest(best, padded[r:r + batch_size], padded[c:c + batch_size],
                                  valid[c:c + batch_size], k)
        radii.append(np.asarray(best[:, k]))
    return np.concatenate(radii)[:n]


@jax.jit
def _inside(ref: jax.Array, ref_radii: jax.Array, sample: jax.Array,
            sample_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per reference point: inside some sample ball; per sample: inside some reference ball."""
    d = _squared_distances(ref, sample)
    return jnp.any(d <= sample_radii[None, :], axis=1), jnp.any(d <= ref_radii[:, None], axis=0)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """ADM's (precision, recall) of ``samples`` against ``reference`` features (see module doc)."""
    reference = np.asarray(reference, np.float32)
    samples = np.asarray(samples, np.float32)
    ref_radii = manifold_radii(reference, k, batch_size)
    sample_radii = manifold_radii(samples, k, batch_size)
    rb, sb = min(batch_size, len(reference)), min(batch_size, len(samples))
    # Padding points get radius −1: no distance is ≤ −1, so they neither hold nor enter a ball.
    ref_p, ref_r = _pad(reference, rb), _pad(ref_radii, rb, -1.0)
    smp_p, smp_r = _pad(samples, sb), _pad(sample_radii, sb, -1.0)
    ref_in = np.zeros(len(ref_p), bool)
    sample_in = np.zeros(len(smp_p), bool)
    for r in range(0, len(ref_p), rb):
        for s in range(0, len(smp_p), sb):
            r_in, s_in = _inside(ref_p[r:r + rb], ref_r[r:r + rb], smp_p[s:s + sb], smp_r[s:s + sb])
            ref_in[r:r + rb] |= np.asarray(r_in)
            sample_in[s:s + sb] |= np.asarray(s_in)
    return float(np.mean(sample_in[:len(samples)])), float(np.mean(ref_in[:len(reference)]))


#: The reference statistics of each feature: ``pool_3`` (FID) and ``spatial`` (sFID).
STATS_OF = {"pool_3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``mu, sigma`` of ``pool_3`` and ``mu_s, sigma_s`` of ``spatial`` (ADM's reference-batch keys)."""
    stats = {}
    for feature, (mu, sigma) in STATS_OF.items():
        stats[mu], stats[sigma] = feature_statistics(features[feature])
    return stats


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionFeatures:
    """The ``inception`` need of a metric (:mod:`kindjax.evaluation.metric`): the samples' features
    (``pool_3``, ``spatial``, ``logits_unbiased``), the reference's statistics (:data:`STAT_KEYS`) and
    its features (``pool_3``, ``spatial``; None: a reference of statistics only)."""

    samples: dict[str, np.ndarray]
    reference_stats: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] | None = None

    def frechet(self, feature: str) -> float:
        """FID (``feature="pool_3"``) or sFID (``"spatial"``): the Fréchet distance of the samples'
        Gaussian to the reference's (:data:`STATS_OF`)."""
        mu, sigma = STATS_OF[feature]
        return frechet_distance(*feature_statistics(self.samples[feature]), self.reference_stats[mu],
                                self.reference_stats[sigma])


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceBatch:
    """An ADM reference ``.npz``: images ``arr_0`` (uint8 NHWC RGB) and/or the statistics
    ``mu, sigma`` (pool_3) and ``mu_s, sigma_s`` (spatial)."""

    path: str
    images: np.ndarray | None
    stats: dict[str, np.ndarray] | None
    preprocessing: str | None = None   # of ``stats``: recorded, or ADM's (:data:`ADM_PREPROCESS`); None without


def reference_keys(path: str) -> set[str]:
    """The arrays an ``.npz`` holds, read from its index only (to check a reference early)."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"reference batch {path!r} not found (eval.reference: an ADM reference .npz "
                                f"with images arr_0 and/or mu, sigma, mu_s, sigma_s)")
    with as_path(path).open("rb") as file, np.load(file) as f:
        keys = set(f.files)
    has_stats = set(STAT_KEYS) <= keys
    if "arr_0" not in keys and not has_stats:
        raise ValueError(f"{path} holds {sorted(keys)}; an ADM reference batch needs images arr_0 "
                         f"and/or all of {list(STAT_KEYS)}")
    return keys


def stats_preprocessing(path: str) -> str | None:
    """The Inception preprocessing of the statistics in reference ``path``: the one it records, else
    ADM's (:data:`ADM_PREPROCESS`); None when it holds no statistics (images only)."""
    with as_path(path).open("rb") as file, np.load(file) as f:
        if not set(STAT_KEYS) <= set(f.files):
            return None
        return recorded_preprocessing(f) or ADM_PREPROCESS


def read_reference(path: str) -> ReferenceBatch:
    keys = reference_keys(path)
    with as_path(path).open("rb") as file, np.load(file) as f:
        images = f["arr_0"] if "arr_0" in keys else None
        stats = {k: f[k] for k in STAT_KEYS} if set(STAT_KEYS) <= keys else None
        preprocessing = (recorded_preprocessing(f) or ADM_PREPROCESS) if stats is not None else None
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3):
        raise ValueError(f"{path}: arr_0 must be uint8 RGB images (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    return ReferenceBatch(path, images, stats, preprocessing)


def write_sample_batch(path: str | BinaryIO, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM's sample format: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int class labels (N,); ``path``: a file
    object, or a local or cloud path (``.npz`` appended when missing, as ``np.savez`` does)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected uint8 (N, H, W, 3) images and (N,) labels, got {images.dtype} "
                         f"{images.shape} and {labels.shape}")
    if isinstance(path, (str, os.PathLike)):
        path = as_path(path if os.fspath(path).endswith(".npz") else os.fspath(path) + ".npz")
        with path.open("wb") as f:
            np.savez(f, arr_0=images, arr_1=labels)
        return
    np.savez(path, arr_0=images, arr_1=labels)
