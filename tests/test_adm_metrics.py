"""ADM metrics (computed through the metric registry) against float64 NumPy/SciPy oracles written here, on
random features."""
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special

from kindjax.evaluation import adm
from kindjax.evaluation.metrics import Inputs, compute_metrics

#: ADM's metrics (the registered metrics of :mod:`kindjax.evaluation.metrics`).
ADM = ("fid", "sfid", "inception_score", "precision", "recall")


def oracle_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


def oracle_inception_score(logits, split_size):
    p = scipy.special.softmax(logits.astype(np.float64), axis=1)
    scores = []
    for part in np.array_split(p, np.arange(split_size, len(p), split_size)):
        kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def oracle_precision_recall(ref, smp, k):
    def radii(x):  # k-th nearest other point: index k of the sorted row (index 0 is the point itself)
        return np.sort(scipy.spatial.distance.cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    d = scipy.spatial.distance.cdist(ref, smp, "sqeuclidean")
    precision = np.mean([np.any(d[:, j] <= radii(ref)) for j in range(len(smp))])
    recall = np.mean([np.any(d[i, :] <= radii(smp)) for i in range(len(ref))])
    return precision, recall


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    ref = rng.normal(size=(61, 12)) @ mix
    smp = 0.8 * rng.normal(size=(47, 12)) @ mix + 3.0
    return ref, smp


def test_fid_and_sfid_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a = {"pool_3": rng.normal(size=(90, 10)) @ rng.normal(size=(10, 10)), "spatial": rng.gamma(2.0, size=(90, 7)),
         "logits_unbiased": rng.normal(size=(90, 6))}
    b = {"pool_3": rng.normal(size=(70, 10)) + 0.3, "spatial": rng.gamma(2.5, size=(70, 7))}
    metrics = compute_metrics(ADM, Inputs(inception=adm.InceptionFeatures(a, adm.statistics(b))))
    assert metrics["fid"] == pytest.approx(oracle_fid(a["pool_3"], b["pool_3"]), rel=1e-8)
    assert metrics["sfid"] == pytest.approx(oracle_fid(a["spatial"], b["spatial"]), rel=1e-8)
    assert metrics["fid"] > 1.0 and set(metrics) == {"fid", "sfid", "inception_score"}   # no reference features


@pytest.mark.parametrize("n, split_size", [(25, 7), (30, 5000)])
def test_inception_score_matches_oracle(n, split_size):
    logits = 3.0 * np.random.default_rng(n).normal(size=(n, 11)).astype(np.float32)
    value = adm.inception_score(logits, split_size)
    assert value == pytest.approx(oracle_inception_score(logits, split_size), rel=1e-10)
    assert 1.0 < value < 11.0


def test_inception_score_bounds():
    confident = np.eye(8)[np.arange(40) % 8] * 60.0
    assert adm.inception_score(confident, 40) == pytest.approx(8.0, rel=1e-6)
    assert adm.inception_score(np.tile(np.arange(8.0), (40, 1)), 40) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("batch_size", [10000, 16])
def test_manifold_radii_match_brute_force(features, batch_size):
    ref, _ = features
    expected = np.sort(scipy.spatial.distance.cdist(ref, ref, "sqeuclidean"), axis=1)[:, 3]
    np.testing.assert_allclose(adm.manifold_radii(ref, k=3, batch_size=batch_size), expected, rtol=1e-4)


@pytest.mark.parametrize("batch_size, k", [(10000, 3), (16, 3), (9, 5)])
def test_precision_recall_match_brute_force(features, batch_size, k):
    ref, smp = features
    precision, recall = adm.precision_recall(ref, smp, k=k, batch_size=batch_size)
    expected = oracle_precision_recall(ref, smp, k)
    assert (precision, recall) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0 and precision != recall


def test_adm_metrics_with_reference_features(features):
    ref, smp = features
    rng = np.random.default_rng(2)
    samples = {"pool_3": smp, "spatial": rng.normal(size=(47, 5)), "logits_unbiased": rng.normal(size=(47, 4))}
    reference = {"pool_3": ref, "spatial": rng.normal(size=(61, 5))}
    metrics = compute_metrics(ADM, Inputs(inception=adm.InceptionFeatures(samples, adm.statistics(reference), reference)))
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(oracle_precision_recall(ref, smp, 3))
    assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall"}


def test_npz_batches(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(5) % 3
    adm.write_sample_batch(str(tmp_path / "s.npz"), images, labels)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
    ref = adm.read_reference(str(tmp_path / "s.npz"))
    assert ref.stats is None and ref.images.shape == (5, 4, 4, 3)
    stats = {k: rng.normal(size=(3,)) for k in adm.STAT_KEYS}
    np.savez(tmp_path / "stats.npz", **stats)
    ref = adm.read_reference(str(tmp_path / "stats.npz"))
    assert ref.images is None and set(ref.stats) == set(adm.STAT_KEYS)
    np.savez(tmp_path / "bad.npz", mu=stats["mu"])
    with pytest.raises(ValueError, match="needs images arr_0"):
        adm.read_reference(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="uint8"):
        adm.write_sample_batch(str(tmp_path / "x.npz"), images.astype(np.float32), labels)
    with pytest.raises(FileNotFoundError, match="eval.reference"):
        adm.read_reference(str(tmp_path / "missing.npz"))
