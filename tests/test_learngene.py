"""Learngene / tailors: loading (workdir, step dir, sliced), partial reads, slicing CLI, assembly."""
import dataclasses
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import ROOT, read_names, tiny_config
from kindjax import assemble, build_model, checkpoints, load_learngene, load_tailors
from kindjax import params as param_rules
from kindjax.checkpoints.slicing import slice_checkpoint
from kindjax.papers.kind.layer import kind_config
from kindjax.train.trainer import train

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("learngene")

CLASSES = (7, 0, 3)


def perturbed(tree, seed):
    """``tree`` + N(0, 0.1²) per leaf, on the leaf's sharding (non-trivial adaLN gates and tailors)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jax.device_put(
        np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32), a.sharding), tree)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A KIND digits run: step 1 trained (8 devices); step 2 = step 1 with perturbed weights."""
    workdir = str(tmp_path_factory.mktemp("kind_run"))
    config = tiny_config()
    config.model.update(depth=1, linear=kind_config(16, 2))
    config.train.num_steps = 1
    state = train(config, workdir, evaluate=None)
    state = dict(state, step=jnp.asarray(2), params=perturbed(state["params"], 1),
                 ema_params=perturbed(state["ema_params"], 2))
    mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"))
    checkpoints.save(mngr, state, config)
    mngr.wait_until_finished()
    mngr.close()
    host = lambda tree: jax.tree.map(np.asarray, tree)
    return types.SimpleNamespace(workdir=workdir, config=config, ema=host(state["ema_params"]),
                                 params=host(state["params"]))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert isinstance(x, np.ndarray)
        np.testing.assert_array_equal(x, np.asarray(y))


def test_load_from_workdir_and_step_dir(run):
    learngene = load_learngene(run.workdir)
    assert (learngene.source.kind, learngene.source.step, learngene.source.item) == ("workdir", 2, "ema_params")
    assert checkpoints.config_json(learngene.config) == checkpoints.config_json(run.config)
    assert_trees_equal(learngene.params, param_rules.split_learngene_tailors(run.ema)[0])
    assert learngene.params["y_embedder"]["embedding"].shape == (1, 64)
    assert not any(param_rules.is_tailor(p) for p, _ in jax.tree_util.tree_leaves_with_path(learngene.params))

    tailors = load_tailors(run.workdir, CLASSES)
    assert tailors.classes == CLASSES
    assert_trees_equal(tailors.params, param_rules.split_learngene_tailors(run.ema, CLASSES)[1])
    raw = load_tailors(run.workdir, CLASSES, ema=False)
    assert raw.source.item == "params"
    assert_trees_equal(raw.params, param_rules.split_learngene_tailors(run.params, CLASSES)[1])

    step_dir = os.path.join(run.workdir, "checkpoints", "1")
    for path, step in ((run.workdir, 1), (step_dir, None), (step_dir, 1)):
        old = load_learngene(path, step=step)
        assert old.source.step == 1 and old.source.checkpoint == step_dir
        assert_trees_equal(old.params, load_learngene(step_dir).params)
    assert not np.array_equal(load_learngene(step_dir).params["x_embedder"]["kernel"],
                              learngene.params["x_embedder"]["kernel"])


def test_each_part_reads_only_its_arrays(run, monkeypatch):
    keys = [".".join(k) for k in traverse_util.flatten_dict(run.ema)]
    label = "y_embedder.embedding"
    tailor_keys = {k for k in keys if ".tailors." in k}
    assert len(tailor_keys) == 6 * 3

    names = read_names(monkeypatch)
    load_learngene(run.workdir)
    assert sorted(names) == sorted(set(keys) - tailor_keys)
    names.clear()
    load_tailors(run.workdir, CLASSES)
    assert sorted(names) == sorted(tailor_keys | {label})


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "kindjax.tools.slice", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow  # 27 s (-n 2, 2 cores)
def test_slice_cli_and_function(run, tmp_path, single_device_env):
    workdir = tmp_path / "copy"
    shutil.copytree(run.workdir, workdir)
    lg_out, t_out = tmp_path / "learngene", tmp_path / "tailors"
    # The CLI runs on one device: the checkpoint was written from 8.
    out = cli(single_device_env, "--run", str(workdir), "--out", str(lg_out), "--part", "learngene")
    assert out.returncode == 0, out.stderr
    assert "Wrote the learngene" in out.stdout and "arrays" in out.stdout and "parameters" in out.stdout
    out = cli(single_device_env, "--run", str(workdir), "--out", str(t_out), "--part", "tailors",
              "--classes", "7,0,3")
    assert out.returncode == 0, out.stderr
    assert "tailors of classes [7, 0, 3]" in out.stdout
    refused = cli(single_device_env, "--run", str(workdir), "--out", str(t_out), "--part", "tailors",
                  "--classes", "1")
    assert refused.returncode != 0 and "exists; pass --force" in refused.stderr
    meta = slice_checkpoint(workdir, tmp_path / "raw", "tailors", [3, 9], ema=False)
    assert (meta["part"], meta["classes"], meta["step"]) == ("tailors", [3, 9], 2)
    assert meta["source"]["item"] == "params" and meta["config"] == checkpoints.config_json(run.config)
    with pytest.raises(FileExistsError, match="--force"):
        slice_checkpoint(workdir, lg_out, "learngene")
    slice_checkpoint(workdir, lg_out, "learngene", step=1, force=True)
    assert load_learngene(lg_out).source.step == 1
    slice_checkpoint(workdir, lg_out, "learngene", force=True)
    with pytest.raises(FileExistsError, match="neither a sliced checkpoint nor an empty directory"):
        slice_checkpoint(workdir, workdir, "learngene", force=True)

    # The sliced checkpoints stand alone.
    shutil.rmtree(workdir)
    learngene = load_learngene(lg_out)
    assert learngene.source.kind == "sliced" and learngene.source.step == 2
    assert_trees_equal(learngene.params, param_rules.split_learngene_tailors(run.ema)[0])
    assert_trees_equal(load_tailors(t_out, CLASSES).params, param_rules.split_learngene_tailors(run.ema, CLASSES)[1])
    assert_trees_equal(load_tailors(t_out, [3, 7]).params, param_rules.split_learngene_tailors(run.ema, [3, 7])[1])
    assert_trees_equal(load_tailors(tmp_path / "raw", [9]).params, param_rules.split_learngene_tailors(run.params, [9])[1])
    with pytest.raises(ValueError, match=r"classes \[1\] are out of range: .* hold classes \(7, 0, 3\)"):
        load_tailors(t_out, [1])
    with pytest.raises(ValueError, match="holds the tailors only, not the learngene"):
        load_learngene(t_out)
    with pytest.raises(ValueError, match="holds the learngene only, not the tailors"):
        load_tailors(lg_out, [0])


def test_assembled_model_equals_full_model(run, tmp_path, capsys):
    slice_checkpoint(run.workdir, tmp_path / "lg", "learngene")
    learngene = load_learngene(tmp_path / "lg")
    assembled = assemble(learngene, load_tailors(run.workdir, CLASSES))
    printed = capsys.readouterr().out
    n_g, n_t = param_rules.count(learngene.params), param_rules.count(param_rules.split_learngene_tailors(run.ema, CLASSES)[1])
    assert f"learngene {n_g:>12,}" in printed and f"tailors   {n_t:>12,}" in printed
    assert f"of the full 10-class model ({param_rules.count(run.ema):,})" in printed
    assert assembled.classes == CLASSES and assembled.model.num_classes == 3
    assert assembled.config.model.num_classes == 3

    k = len(CLASSES)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((k + 1, 8, 8, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, (k + 1,)))
    labels = np.concatenate([assembled.labels(CLASSES), [k]])
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    out = jax.jit(assembled.model.apply)({"params": assembled.params}, x, t, jnp.asarray(labels))
    full_apply = jax.jit(build_model(run.config).apply)
    ema = jax.tree.map(jnp.asarray, run.ema)
    full = full_apply({"params": ema}, x, t, jnp.asarray([*CLASSES, 10]))
    assert float(jnp.max(jnp.abs(out - full))) <= 1e-6
    # The tailors matter: the same input under another class gives another output.
    other = full_apply({"params": ema}, x, t, jnp.asarray([1, 2, 4, 5]))
    assert float(jnp.max(jnp.abs(other[:k] - full[:k]))) > 1e-2

    assemble(learngene, load_tailors(run.workdir, [5]), verbose=False)
    assert capsys.readouterr().out == ""


def test_errors(run, tmp_path):
    with pytest.raises(ValueError, match=r"classes \[10\] are out of range: .* has classes 0\.\.9"):
        load_tailors(run.workdir, [0, 10])
    with pytest.raises(ValueError, match="repeated"):
        load_tailors(run.workdir, [1, 1])
    with pytest.raises(ValueError, match="no checkpoint at step 7; it has steps \\[1, 2\\]"):
        load_learngene(run.workdir, step=7)
    with pytest.raises(ValueError, match="holds step 1 only"):
        load_learngene(os.path.join(run.workdir, "checkpoints", "1"), step=2)
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="holds no kindjax checkpoint"):
            load_learngene(path)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
        load_tailors(tmp_path / "empty", [0])

    tailors = load_tailors(run.workdir, [0])
    other = run.config.copy_and_resolve_references()
    other.model.linear.n_learngene = 8
    with pytest.raises(ValueError, match="come from different models: model.linear.n_learngene: learngene 16 vs tailors 8"):
        assemble(load_learngene(run.workdir), dataclasses.replace(tailors, config=other), verbose=False)

    dense = tiny_config()
    dense.model.depth = 1
    zeros = jnp.zeros((1,), jnp.int32)
    params = jax.jit(build_model(dense).init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), zeros, zeros)["params"]
    mngr = checkpoints.manager(str(tmp_path / "dense" / "checkpoints"))
    checkpoints.save(mngr, {"step": 1, "params": params, "ema_params": params,
                            "opt_state": {"count": jnp.zeros(())}}, dense)
    mngr.wait_until_finished()
    mngr.close()
    with pytest.raises(ValueError, match="has no tailors \\(model.linear.kind='dense'\\)"):
        load_tailors(tmp_path / "dense", [0])
    # A dense DiT has no learngene: refused, naming what the workdir holds (issue 16).
    with pytest.raises(ValueError, match="holds a 'dense' DiT \\(model.linear.kind='dense'\\), whose layers have no tailors"):
        load_learngene(tmp_path / "dense")
