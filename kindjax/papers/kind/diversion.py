"""KIND's analysis of what the learngene alone knows: Table 5's statistics and Figure 7's grid.

**Table 5** compares "learngenes themselves (w/o tailors)" with the pre-trained dense model
(and raw images) "on training tasks" by entropy↑, variance↓ and kurtosis↓, without defining
them.  The reading implemented here: for every image, the classifier's predicted class
distribution ``p`` (the FID Inception's softmax over its 1008 ImageNet logits; for the digits,
the digits evaluator's softmax over the ten digits), and per image

    entropy  H(p) = −Σ_k p_k log p_k  (nats)
    variance Var_k(p) = mean_k (p_k − p̄)²
    kurtosis mean_k (p_k − p̄)⁴ / Var_k(p)²     (Pearson, not excess)

each averaged over the images.  Why this reading: a one-hot ``p`` over 1000 classes has
variance ≈ 9.99e-4 and kurtosis ≈ 998, the ceilings the paper's raw-image row (6.4e-4,
884.3) approaches, and all three rows' entropies (1.46–4.05) lie in ``[0, log 1000 = 6.9]``:
the table measures how committed to one class each image is, and a class-agnostic
learngene commits least.

**Learngene only.**  "w/o tailors" is read as every tailor component switched off
(``σ_T = 0``: :func:`without_tailors`) while the class label still conditions adaLN
(``mode="zero_tailors"``, the default, as Figure 7 shows the learngene "across different
class conditions"); ``mode="null_class"`` also drops the label (the learngene's own null
class, as the digits report's ``learngene_only_*`` figures do).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kindjax import params as param_rules

MODES = ("zero_tailors", "null_class")


def prediction_statistics(probabilities: np.ndarray) -> dict[str, float]:
    """Mean over images of the entropy (nats), variance and Pearson kurtosis of each row of
    ``probabilities`` (N, K) (see the module docstring)."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected probabilities of shape (N, K ≥ 2), got {p.shape}")
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    centred = p - p.mean(axis=1, keepdims=True)
    variance = np.mean(centred ** 2, axis=1)
    kurtosis = np.mean(centred ** 4, axis=1) / np.maximum(variance, 1e-300) ** 2
    return {"entropy": float(entropy.mean()), "variance": float(variance.mean()),
            "kurtosis": float(kurtosis.mean())}


def without_tailors(params: Any) -> Any:
    """``params`` with every tailor's singular values set to zero (``σ_T = 0``): each KIND layer
    computes with its learngene ``U_G diag(σ_G) V_Gᵀ`` alone; everything else is unchanged."""
    def zero(path: tuple, leaf: Any) -> Any:
        names = param_rules.path_names(path)
        return jnp.zeros_like(leaf) if param_rules.is_tailor(path) and names[-1] == "sigma" else leaf

    found = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if param_rules.is_tailor(p)]
    if not found:
        raise ValueError("these parameters have no tailors: the learngene-only model needs a KIND checkpoint")
    return param_rules.map_with_path(zero, params)


def learngene_only(params: Any, labels: np.ndarray, num_classes: int, mode: str) -> tuple[Any, np.ndarray]:
    """The parameters and labels that sample the learngene alone (``mode`` of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    if mode == "null_class":
        return params, np.full_like(np.asarray(labels), num_classes)
    return without_tailors(params), np.asarray(labels)


def diversion_table(rows: dict[str, np.ndarray]) -> str:
    """Markdown of Table 5: one row per name, from its class probabilities."""
    lines = ["| images | entropy ↑ | variance ↓ | kurtosis ↓ |", "|---|---:|---:|---:|"]
    for name, probabilities in rows.items():
        s = prediction_statistics(probabilities)
        lines.append(f"| {name} | {s['entropy']:.3f} | {s['variance']:.3e} | {s['kurtosis']:.1f} |")
    return "\n".join(lines)


def figure_grid(sample: Callable[[Any, np.ndarray, int], np.ndarray], params: Any, classes: Sequence[int],
                seeds: Sequence[int] = (0, 1)) -> np.ndarray:
    """Figure 7: ``(len(classes), 2·len(seeds))`` images; for each seed, a column with tailors and
    one without (``σ_T = 0``), from the same noise. ``sample(params, labels, seed)`` → images."""
    labels = np.asarray(classes, np.int32)
    bare = without_tailors(params)
    columns = []
    for seed in seeds:
        columns += [sample(params, labels, seed), sample(bare, labels, seed)]
    return np.stack(columns, axis=1)
