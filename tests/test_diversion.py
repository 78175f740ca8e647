"""KIND's learngene analysis: Table 5's statistics against SciPy, the tailor switch-off, the command."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from conftest import tiny_config
from kindjax.papers.kind.analyze import analyze
from kindjax.papers.kind.diversion import learngene_only, prediction_statistics, without_tailors
from kindjax.papers.kind.layer import KINDLinear, kind_config
from kindjax.train.trainer import train


def test_statistics_equal_scipy_on_random_distributions():
    p = np.random.default_rng(0).dirichlet(np.full(37, 0.3), size=64)
    s = prediction_statistics(p)
    assert np.isclose(s["entropy"], scipy.stats.entropy(p, axis=1).mean(), rtol=1e-12)
    assert np.isclose(s["variance"], np.var(p, axis=1).mean(), rtol=1e-12)
    assert np.isclose(s["kurtosis"], scipy.stats.kurtosis(p, axis=1, fisher=False).mean(), rtol=1e-10)
    one_hot = np.eye(1000)[:3]                    # the ceilings the paper's raw-image row approaches
    s = prediction_statistics(one_hot)
    assert s["entropy"] == 0 and np.isclose(s["variance"], 1e-3 - 1e-6) and 997 < s["kurtosis"] < 999
    with pytest.raises(ValueError, match="N, K"):
        prediction_statistics(np.ones(5))


def test_without_tailors_makes_every_class_compute_with_the_learngene_alone():
    layer = KINDLinear(features=12, n_classes=3, n_tailor=2, n_learngene=4)
    x = jax.random.normal(jax.random.key(0), (4, 5, 10))
    y = jnp.array([0, 1, 2, 3])                   # 3 = the null class: the learngene alone by design
    params = layer.init(jax.random.key(1), x, y)
    bare = without_tailors(params)
    out = layer.apply(params, x, y)
    out_bare = layer.apply(bare, x, y)
    assert not np.allclose(out[:3], layer.apply(params, x, jnp.full((4,), 3))[:3])
    np.testing.assert_allclose(out_bare, layer.apply(params, x, jnp.full((4,), 3)), atol=1e-6)
    np.testing.assert_array_equal(out_bare[3], out[3])
    _, labels = learngene_only(params, np.array([0, 2]), 3, "null_class")
    assert labels.tolist() == [3, 3]
    with pytest.raises(ValueError, match="no tailors"):
        without_tailors({"dense": {"kernel": jnp.ones((2, 2))}})


@pytest.mark.slow  # 140 s (-n 2, 2 cores)
def test_analyze_writes_table5_and_figure7(tmp_path):
    kind = tiny_config()
    kind.data.classes, kind.model.num_classes = (0, 1, 2), 3
    kind.model.linear = kind_config(n_learngene=16, n_tailor=4)
    kind.train.update(num_steps=2, checkpoint_every=2)
    dense = tiny_config()
    dense.data.classes, dense.model.num_classes = (0, 1, 2), 3
    dense.train.update(num_steps=2, checkpoint_every=2)
    train(kind, str(tmp_path / "kind"))
    train(dense, str(tmp_path / "dense"))
    lines = []
    stats = analyze(str(tmp_path / "kind"), str(tmp_path / "out"), str(tmp_path / "dense"), samples=12,
                    log=lines.append)
    assert list(stats) == ["raw images of the training classes", "pre-trained (dense) model",
                           "KIND (learngene + tailors)", "learngene (w/o tailors)"]
    for row in stats.values():
        assert 0 <= row["entropy"] <= np.log(10) and row["variance"] > 0 and row["kurtosis"] >= 1
    saved = json.load(open(tmp_path / "out" / "table5.json"))
    assert saved["rows"] == stats and saved["mode"] == "zero_tailors"
    assert "| learngene (w/o tailors) |" in open(tmp_path / "out" / "table5.md").read()
    picture = np.asarray(Image.open(tmp_path / "out" / "figure7.png"))
    assert picture.shape[0] > picture.shape[1] / 4 * 3 - 8          # 3 class rows × 4 columns of 8×8 upscaled
    assert os.path.getsize(tmp_path / "out" / "figure7.png") > 0 and "figure7.png" in lines[-1]
