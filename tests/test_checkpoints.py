"""kindjax.checkpoints: locating the three kinds of checkpoint directory, partial reads, sharded restores."""
import os
import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conftest import read_names, tiny_config
from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.checkpoints.slicing import slice_checkpoint
from kindjax.config import ConfigError
from kindjax.papers.kind.layer import kind_config


def tree(seed):
    """A small parameter tree with a learngene leaf, a tailor leaf (3 classes) and a label table."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {"block": {"q": {"kernel": draw(4, 4)}, "tailors": {"u": draw(3, 4, 2)}},
            "y_embedder": {"embedding": draw(4, 4)}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with steps 1 and 2 (no training: hand-made trees), and the learngene of step 2 sliced."""
    root = tmp_path_factory.mktemp("ckpt")
    workdir = str(root / "run")
    config = tiny_config()
    config.model.linear = kind_config(n_learngene=4, n_tailor=1)   # the trees hold tailors: a KIND model
    mngr = checkpoints.manager(os.path.join(workdir, checkpoints.CHECKPOINTS))
    for step in (1, 2):
        checkpoints.save(mngr, {"step": step, "params": tree(step), "ema_params": tree(10 + step),
                                "opt_state": {"count": np.zeros((), np.int32)}}, config)
    mngr.wait_until_finished()
    mngr.close()
    sliced = str(root / "learngene")
    slice_checkpoint(workdir, sliced, "learngene")
    return types.SimpleNamespace(workdir=workdir, config=config, sliced=sliced,
                                 step_dir=os.path.join(workdir, checkpoints.CHECKPOINTS, "1"))


def test_locate_each_kind_of_path(saved):
    latest = checkpoints.locate(saved.workdir)
    assert (latest.kind, latest.meta["step"]) == ("workdir", 2)
    assert str(latest.directory) == os.path.join(saved.workdir, checkpoints.CHECKPOINTS, "2")
    assert checkpoints.config_json(checkpoints.config_of(latest)) == checkpoints.config_json(saved.config)
    assert checkpoints.locate(saved.workdir, step=1).directory == checkpoints.locate(saved.step_dir).directory

    step = checkpoints.locate(saved.step_dir)
    assert (step.kind, step.meta["step"]) == ("step", 1)
    assert checkpoints.source(step, ema=False) == checkpoints.Source(
        saved.step_dir, "step", saved.step_dir, 1, "params")
    mngr = checkpoints.manager(os.path.join(saved.workdir, checkpoints.CHECKPOINTS), read_only=True)
    assert checkpoints.read_meta(mngr, 1) == checkpoints.read_meta(saved.step_dir) == step.meta
    assert checkpoints.read_meta(mngr)["step"] == 2
    mngr.close()

    sliced = checkpoints.locate(saved.sliced)
    assert (sliced.kind, sliced.meta["part"]) == ("sliced", "learngene")
    # A sliced checkpoint names the training checkpoint and item it came from, whatever ``ema`` says.
    assert checkpoints.source(sliced, ema=False) == checkpoints.Source(
        saved.sliced, "sliced", str(latest.directory), 2, "ema_params")
    np.testing.assert_array_equal(checkpoints.restore_item(sliced, "learngene")["y_embedder"]["embedding"],
                                  tree(12)["y_embedder"]["embedding"][-1:])


def test_restore_leaves_reads_only_the_kept_leaves(saved, monkeypatch):
    names = read_names(monkeypatch)
    read = checkpoints.restore_leaves(os.path.join(saved.step_dir, "ema_params"), param_rules.has_class_rows)
    assert sorted(names) == ["block.tailors.u", "y_embedder.embedding"]
    assert set(read) == {"block", "y_embedder"} and set(read["block"]) == {"tailors"}
    assert isinstance(read["block"]["tailors"]["u"], np.ndarray)
    np.testing.assert_array_equal(read["block"]["tailors"]["u"], tree(11)["block"]["tailors"]["u"])
    names.clear()
    whole = checkpoints.restore_item(checkpoints.locate(saved.step_dir), "params")
    assert len(names) == 3
    np.testing.assert_array_equal(whole["block"]["q"]["kernel"], tree(1)["block"]["q"]["kernel"])


def test_check_part(saved):
    checkpoints.check_part(checkpoints.locate(saved.workdir), "tailors")  # a training checkpoint holds both
    checkpoints.check_part(checkpoints.locate(saved.sliced), "learngene")
    with pytest.raises(ValueError, match="holds the learngene only, not the tailors; read the tailors from .*/2"):
        checkpoints.check_part(checkpoints.locate(saved.sliced), "tailors")


def test_restore_state_item_onto_shardings(saved, tmp_path):
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree(0))
    ema, step = checkpoints.restore_state_item(saved.workdir, "ema_params", target, saved.config, step=1)
    assert step == 1
    for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(tree(11))):
        assert got.sharding == replicated
        np.testing.assert_array_equal(np.asarray(got), want)
    assert checkpoints.restore_state_item(saved.workdir, "params", target, saved.config)[1] == 2

    with pytest.raises(ConfigError, match=r"has no checkpoint at step 7; it has \[1, 2\]"):
        checkpoints.restore_state_item(saved.workdir, "ema_params", target, saved.config, step=7)
    with pytest.raises(ConfigError, match="holds no checkpoint: train first"):
        checkpoints.restore_state_item(str(tmp_path), "ema_params", target, saved.config)
    other = saved.config.copy_and_resolve_references()
    other.model.depth = 3
    with pytest.raises(ConfigError, match="holds a checkpoint of a different model .model.depth: checkpoint 2 vs"):
        checkpoints.restore_state_item(saved.workdir, "ema_params", target, other)


def test_a_model_key_newer_than_the_checkpoint_counts_as_its_default():
    """A checkpoint written before ``model.drop_path`` existed resumes under the default (0) and is
    refused, naming the key, when the config turns it on."""
    from kindjax.checkpoints.training import check_same_model, config_json

    config = tiny_config()
    saved = config_json(config)
    del saved["model"]["drop_path"]
    check_same_model(saved, config, "old_run")
    config.model.drop_path = 0.1
    with pytest.raises(ConfigError, match=r"model.drop_path: checkpoint 0.0 vs config 0.1"):
        check_same_model(saved, config, "old_run")


def test_a_checkpoint_resumes_with_another_attention_remat_or_scan():
    """``model.attention``, ``remat`` and ``scan_blocks`` choose how the step computes, not the model:
    a run written with the XLA attention resumes under the ImageNet configs' ``auto`` (and a scan, and
    remat); its finished stages keep their fingerprint; another width is still refused."""
    from kindjax.checkpoints.training import check_same_model, config_json
    from kindjax.train.stages import fingerprint

    config = tiny_config()
    saved = config_json(config)
    before = fingerprint(config, {})
    config.model.update(attention="auto", remat="block", scan_blocks=True)
    check_same_model(saved, config, "xla_run")
    assert fingerprint(config, {}) == before
    config.model.hidden_size = 32
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 64 vs config 32"):
        check_same_model(saved, config, "xla_run")
    assert fingerprint(config, {}) != before
