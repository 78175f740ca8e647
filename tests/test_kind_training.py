"""Training KIND: the class gate, sharding, transfer with a frozen learngene, resume."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from kindjax import params as param_rules
from kindjax.papers.kind.layer import kind_config
from kindjax.papers.kind.transfer import transfer_config
from kindjax.train.trainer import Trainer, train


def kind_tiny(num_classes=7, classes=(0, 1, 2, 3, 4, 5, 6)):
    c = tiny_config()
    c.data.classes = classes
    c.model.num_classes = num_classes
    c.model.class_dropout = 0.0
    c.model.linear = kind_config(n_learngene=16, n_tailor=4)
    return c


def batch_of(trainer, labels, seed=0):
    images = np.random.default_rng(seed).uniform(-1, 1, (len(labels), 8, 8, 1)).astype(np.float32)
    return {"image": jax.device_put(images, trainer.batch_sharding),
            "label": jax.device_put(np.asarray(labels, np.int32), trainer.batch_sharding)}


def leaves(tree, predicate):
    return {param_rules.path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree) if predicate(p)}


def test_class_gate_leaves_absent_tailors_and_their_moments_bit_identical(tmp_path):
    config = kind_tiny()
    config.model.adaln_init = "gaussian"  # adaLN-Zero would give the blocks zero gradient at first
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    state = trainer.fresh_state()
    # Three steps: by the last one the Adam moments are non-zero, so a missing gate would
    # move classes 2..6 through momentum (and weight decay) as well as through the step.
    for _ in range(3):
        before = jax.tree.map(np.asarray, state)
        state, _ = trainer.step_fn(state, batch_of(trainer, [0, 1] * 8))
    absent, present = slice(2, 7), slice(0, 2)
    for tree in ("params", "opt_state"):
        old = leaves(before[tree], param_rules.has_class_rows)
        new = leaves(state[tree], param_rules.has_class_rows)
        assert old, tree
        for name in old:
            if new[name].ndim == 0:  # Adam's step count
                continue
            np.testing.assert_array_equal(new[name][absent], old[name][absent], err_msg=name)
    moved = leaves(state["params"], param_rules.is_tailor)
    old = leaves(before["params"], param_rules.is_tailor)
    assert any(not np.array_equal(moved[n][present], old[n][present]) for n in moved)
    lg_new, lg_old = leaves(state["params"], param_rules.is_learngene), leaves(before["params"], param_rules.is_learngene)
    assert any(not np.array_equal(lg_new[n], lg_old[n]) for n in lg_new)


@pytest.mark.slow  # 85 s (one core, beside a pre-flight compile)
def test_gathered_tailor_rows_step_equals_the_all_reduced_step_and_keeps_absent_classes(tmp_path):
    """``train.class_row_reduce="gather"`` on 8 devices (data 2 × fsdp 4): each device sends the gradient rows
    of its own labels; the step equals the all-reduced one and leaves absent classes bit-identical."""
    config = kind_tiny()
    config.model.adaln_init = "gaussian"
    config.mesh.update(data=2, fsdp=4)
    labels = [0, 1, 1, 3, 0, 0, 3, 1] * 2            # classes 2, 4, 5, 6 absent
    states = {}
    for how in ("all_reduce", "gather"):
        config.train.class_row_reduce = how
        trainer = Trainer(config, str(tmp_path / how))
        state = trainer.fresh_state()
        before = jax.tree.map(np.asarray, state)
        states[how], _ = trainer.step_fn(state, batch_of(trainer, labels))
    for a, b in zip(jax.tree.leaves(states["all_reduce"]), jax.tree.leaves(states["gather"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    absent = [2, 4, 5, 6]
    for tree in ("params", "opt_state"):
        old, new = leaves(before[tree], param_rules.has_class_rows), leaves(states["gather"][tree], param_rules.has_class_rows)
        for name in old:
            if new[name].ndim:
                np.testing.assert_array_equal(new[name][absent], old[name][absent], err_msg=name)


@pytest.mark.slow  # 51 s gated, 31 s grouped (serial, 2026-12-07)
@pytest.mark.parametrize("formulation", ["gated", "grouped"])   # grouped under FSDP: docs/benchmarks.md's DiT-L setting
def test_kind_sharded_step_equals_single_device(tmp_path, formulation):
    config = kind_tiny()
    config.model.linear.formulation = formulation
    single = Trainer(config, str(tmp_path / "a"), devices=jax.devices()[:1])
    config.mesh.update(data=2, fsdp=4)
    sharded = Trainer(config, str(tmp_path / "b"))
    s1, s8 = single.fresh_state(), sharded.fresh_state()
    for step in range(2):
        s1, _ = single.step_fn(s1, single.global_batch(step))
        s8, _ = sharded.step_fn(s8, sharded.global_batch(step))
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 93 s (-n 2, 2 cores)
def test_transfer_freezes_learngene_and_trains_fresh_tailors(tmp_path):
    config = kind_tiny()
    config.train.num_steps = 4
    pre = train(config, str(tmp_path / "pre"))
    config.transfer.update(classes=(7, 8, 9), num_steps=6, lr=1e-3)
    tconfig = transfer_config(config, str(tmp_path / "pre"))
    trainer = Trainer(tconfig, str(tmp_path / "tr"))
    start = jax.tree.map(np.asarray, trainer.fresh_state())  # host copy: the step donates its input
    learngene_pre, _ = param_rules.split_learngene_tailors(pre["ema_params"])
    learngene_start, tailors_start = param_rules.split_learngene_tailors(start["params"])
    # The transferred learngene is the pre-trained EMA learngene, exactly.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 learngene_start, learngene_pre)
    # Fresh tailors are orthonormal, and orthogonal to the (trained) learngene factors.
    layer = start["params"]["block_0"]["attn"]["q"]
    for factor in ("U", "V"):
        learngene_cols = np.asarray(layer["learngene"][factor])
        tailor_cols = np.asarray(layer["tailors"][factor]).transpose(1, 0, 2).reshape(learngene_cols.shape[0], -1)
        np.testing.assert_allclose(tailor_cols.T @ tailor_cols, np.eye(tailor_cols.shape[1]), atol=1e-5)
        np.testing.assert_allclose(learngene_cols.T @ tailor_cols, 0.0, atol=1e-5)
    state = jax.device_put(start, trainer.state_sharding)
    for step in range(6):
        state, _ = trainer.step_fn(state, trainer.global_batch(step))
    learngene_end, tailors_end = param_rules.split_learngene_tailors(state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 learngene_end, learngene_start)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), tailors_end, tailors_start)
    assert all(jax.tree.leaves(changed))


@pytest.mark.slow  # 31 s (-n 2, 2 cores)
def test_transfer_refuses_a_learngene_of_another_shape(tmp_path):
    config = kind_tiny()
    config.train.num_steps = 1
    train(config, str(tmp_path / "pre"))
    config.transfer.update(classes=(7, 8, 9))
    tconfig = transfer_config(config, str(tmp_path / "pre"))
    tconfig.model.linear.n_learngene = 12
    with pytest.raises(ValueError, match="n_learngene: learngene 16 vs config 12"):
        Trainer(tconfig, str(tmp_path / "tr")).fresh_state()


@pytest.mark.slow  # 44 s (-n 2, 2 cores)
def test_kind_resume_equals_uninterrupted(tmp_path):
    config = kind_tiny()
    config.train.update(num_steps=6, checkpoint_every=3)
    straight = train(config, str(tmp_path / "a"))
    config.train.num_steps = 3
    train(config, str(tmp_path / "b"))
    config.train.num_steps = 6
    resumed = train(config, str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
