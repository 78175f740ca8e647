"""Fréchet distance between Gaussians fitted to feature sets (the FID formula).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})

Σ1Σ2 is not symmetric, but with A = Σ1^{1/2} it is similar to the symmetric PSD
matrix A Σ2 A, so Tr((Σ1Σ2)^{1/2}) = Σ_i sqrt(λ_i(A Σ2 A)). Both square roots are
taken with ``eigh`` in float64, eigenvalues at round-off level (n·eps·max|λ|, or
negative) set to 0, which stays real and accurate for rank-deficient covariances,
unlike a general ``sqrtm`` of the non-symmetric product.
"""
from __future__ import annotations

import numpy as np


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {matrix.shape}")
    return 0.5 * (matrix + matrix.T)


def _round_off_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
    """Set λ ≤ n·eps·max|λ| (zero up to round-off, incl. negative ones) to exactly 0."""
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """``Q diag(sqrt(λ₊)) Qᵀ`` for ``matrix = Q diag(λ) Qᵀ`` (λ₊: λ with round-off zeroed)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(_round_off_to_zero(eigenvalues))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 Σ_i sqrt(λ_i(Σ1^{1/2} Σ2 Σ1^{1/2}))`` in float64."""
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
    if not mu1.shape == mu2.shape == sigma1.shape[:1] == sigma2.shape[:1]:
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    cross = _symmetric(root1 @ sigma2 @ root1)
    trace_sqrt = np.sum(np.sqrt(_round_off_to_zero(np.linalg.eigvalsh(cross))))
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``μ = mean_n f_n`` and unbiased covariance ``Σ = Σ_n (f_n − μ)(f_n − μ)ᵀ / (N − 1)``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, F), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)
