"""A checkpoint written before the core/papers layout (kindjax db332eb: a tiny KIND digits run,
2 steps, ``tests/data/pre_layout_kind``) still loads: its config is this model's, its learngene
and tailors read apart and assemble into the model the full checkpoint computes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from kindjax import checkpoints
from kindjax.checkpoints.learngene import assemble, load_learngene, load_params, load_tailors
from kindjax.models.dit import build_model
from kindjax.train.stages import check_workdir
from conftest import ROOT

OLD = f"{ROOT}/tests/data/pre_layout_kind"


def old_run_config():
    """The config the old run was started with (``configs/kind_digits.py`` and its overrides)."""
    from configs.kind_digits import get_config

    c = get_config()
    c.job = "train"
    c.model.update(hidden_size=32, depth=1, num_heads=2)
    c.model.linear.update(n_learngene=4, n_tailor=2)
    c.train.update(batch_size=8, num_steps=2, checkpoint_every=2, log_every=1, sample_every=1000)
    c.sample.update(num_steps=2, grid_per_class=1)
    c.eval.update(num_samples=7, batch_size=7)
    c.optim.warmup_steps = 0
    return c


@pytest.fixture
def old_run(tmp_path):
    shutil.copytree(OLD, tmp_path / "kind")
    return str(tmp_path / "kind")


def test_its_config_is_read_as_this_model(old_run):
    config = old_run_config()
    saved = checkpoints.config_of(checkpoints.locate(old_run))
    assert saved.model.linear.kind == "kind" and saved.transfer.num_steps == config.transfer.num_steps
    check_workdir(config, old_run)   # refuses a workdir of another model: this one is the same
    other = old_run_config()
    other.model.linear.n_tailor = 3
    with pytest.raises(ValueError, match="n_tailor"):
        check_workdir(other, old_run)


def test_its_parts_assemble_into_the_full_model(old_run):
    params, config = load_params(old_run, ema=False)   # the trained weights (the EMA is near the init)
    small = assemble(load_learngene(old_run, ema=False), load_tailors(old_run, (5, 1), ema=False), verbose=False)
    full = build_model(config)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    t = np.array([3, 700], np.int32)
    want = full.apply({"params": params}, x, t, np.array([5, 1], np.int32))
    got = small.model.apply({"params": small.params}, x, t, small.labels([5, 1]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(np.abs(np.asarray(want)).mean()) > 1e-3   # a model that computes something
