"""FINE: one shared U, V per role fed by every block, the layer against a float64 oracle,
its init scale, and the learngene initialising DiTs of other depth, width and rank."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from kindjax import params as param_rules
from kindjax.config import ConfigError
from kindjax.transfer.fine import (extract_fine_learngene, init_from_config, init_from_fine_learngene, is_fine_learngene,
                          is_layer_sigma, load_fine_learngene, mean_sigma)
from kindjax.layers import ROLES
from kindjax.layers.dense import DenseLinear
from kindjax.layers.fine import FineLinear, fine_config, init_bases
from kindjax.layers.kind import init_sigma
from kindjax.models.dit import build_model
from kindjax.models.dit import init_params
from kindjax.train.trainer import Trainer, train


def fine_model_config(hidden=32, depth=3, rank=8, heads=2):
    config = tiny_config()
    config.model.update(hidden_size=hidden, depth=depth, num_heads=heads, linear=fine_config(rank))
    return config


def fresh_params(model, seed):
    return jax.jit(lambda key: init_params(key, model))(jax.random.key(seed))


def leaves(tree):
    return {param_rules.path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def dit_inputs(key, batch=4):
    kx, kt, ky = jax.random.split(key, 3)
    return (jax.random.normal(kx, (batch, 8, 8, 1)), jax.random.randint(kt, (batch,), 0, 1000),
            jax.random.randint(ky, (batch,), 0, 11))


def test_shared_factor_is_one_array_per_role_and_every_block_feeds_its_gradient():
    depth = 3
    model = build_model(fine_model_config(depth=depth))
    x, t, y = dit_inputs(jax.random.key(0))
    params = fresh_params(model, 1)
    flat = leaves(params)
    # One U and one V per role in the whole tree, under fine_bases; the blocks own only σ and b.
    assert sorted(k for k in flat if k.endswith("/U")) == [f"fine_bases/{r}/U" for r in sorted(ROLES)]
    assert sorted(k for k in flat if k.endswith("/V")) == [f"fine_bases/{r}/V" for r in sorted(ROLES)]
    for i in range(depth):
        for role in ROLES:
            prefix = f"block_{i}/attn/{role}" if role in ("q", "k", "v", "attn_out") else f"block_{i}/{role}"
            assert sorted(k for k in flat if k.startswith(prefix + "/")) == [prefix + "/bias", prefix + "/sigma"]
    # Non-zero adaLN gates and output projection, random σ, so gradient reaches the blocks.
    rng = np.random.default_rng(0)
    params = param_rules.map_with_path(lambda p, v: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
                             if "adaln_modulation" in param_rules.path_string(p) or "final_layer" in param_rules.path_string(p)
                             or is_layer_sigma(p) else v, params)

    grad = jax.jit(jax.grad(lambda q: jnp.mean(model.apply({"params": q}, x, t, y) ** 2)))

    def grad_bases(live_blocks):
        """∂L/∂(U, V) with σ of every block outside ``live_blocks`` set to 0."""
        p = param_rules.map_with_path(lambda path, v: v * 0 if is_layer_sigma(path) and not any(
            f"block_{i}" in param_rules.path_names(path) for i in live_blocks) else v, params)
        return leaves(grad(p)["fine_bases"])

    assert all(np.abs(g).max() == 0 for g in grad_bases([]).values())  # no block: nothing reaches U, V
    singles = [grad_bases([i]) for i in range(depth)]
    full = grad_bases(range(depth))
    for name in full:
        for i in range(depth):
            assert np.abs(singles[i][name]).max() > 1e-6, (name, i)  # block i alone moves the shared factor
            assert not np.allclose(singles[i][name], full[name])       # and the others add to it


@pytest.mark.parametrize("d_in, d_out, rank, rows", [(16, 24, 4, 10), (8, 8, 8, 200)])
def test_fine_layer_equals_float64_formula(d_in, d_out, rank, rows):
    """``out = x · Wᵀ + b`` with ``W = U diag(σ) Vᵀ`` of shape ``(d_out, d_in)``; both association
    routes of the product (thin factors for few rows, the built matrix for many)."""
    rng = np.random.default_rng(rank)
    u, v = rng.standard_normal((d_out, rank)), rng.standard_normal((d_in, rank))
    sigma, bias = rng.standard_normal(rank), rng.standard_normal(d_out)
    x = rng.standard_normal((2, rows // 2, d_in))
    layer = FineLinear(features=d_out, bases={"U": jnp.asarray(u, jnp.float32), "V": jnp.asarray(v, jnp.float32)})
    out = layer.apply({"params": {"sigma": jnp.asarray(sigma, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}},
                      jnp.asarray(x, jnp.float32))
    w = u @ np.diag(sigma) @ v.T
    np.testing.assert_allclose(np.asarray(out), x @ w.T + bias, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())


@pytest.mark.parametrize("d_in, d_out, rank", [(64, 64, 16), (64, 256, 64), (256, 64, 8)])
def test_init_has_the_output_scale_of_xavier_dense(d_in, d_out, rank):
    bases = init_bases(jax.random.key(0), d_in, d_out, rank)
    for f in bases.values():
        np.testing.assert_allclose(np.asarray(f.T @ f), np.eye(rank), atol=1e-5)
    x = jax.random.normal(jax.random.key(1), (4096, d_in))
    fine = FineLinear(features=d_out, bases=bases)
    out = fine.apply(fine.init(jax.random.key(2), x), x)
    dense = DenseLinear(features=d_out)
    ref = dense.apply(dense.init(jax.random.key(3), x), x)
    ratio = float(jnp.std(out) / jnp.std(ref))
    assert 0.8 < ratio < 1.2, ratio
    assert float(fine.init(jax.random.key(2), x)["params"]["sigma"][0]) == pytest.approx(init_sigma(d_in, d_out, rank))


def test_config_errors_name_the_key():
    config = fine_model_config(hidden=32, rank=33)
    with pytest.raises(ConfigError, match=r"linear.rank=33 .* min\(d_in, d_out\) = 32"):
        build_model(config)
    config.model.linear = fine_config(8)
    config.model.linear.n_tailor = 2
    with pytest.raises(ConfigError, match=r"unknown keys \['n_tailor'\]"):
        build_model(config)
    config.model.linear = fine_config(0)
    with pytest.raises(ConfigError, match="linear.rank must be a positive int"):
        build_model(config)
    layer = FineLinear(features=4, bases=None)
    with pytest.raises(ValueError, match="needs the shared factors"):
        layer.init(jax.random.key(0), jnp.ones((1, 4)))


def random_learngene(rng, hidden, rank, mlp_ratio=4):
    """A trained-looking learngene: Gaussian factors (not orthonormal)."""
    mlp = hidden * mlp_ratio
    shapes = {r: (hidden, hidden) for r in ("q", "k", "v", "attn_out")}
    shapes.update(mlp_in=(hidden, mlp), mlp_out=(mlp, hidden))
    return {"fine_bases": {r: {"U": rng.standard_normal((d_out, rank)).astype(np.float32),
                               "V": rng.standard_normal((d_in, rank)).astype(np.float32)}
                           for r, (d_in, d_out) in shapes.items()}}


def test_init_from_learngene_crops_extends_and_keeps_the_rest_fresh():
    rng = np.random.default_rng(0)
    source = random_learngene(rng, hidden=32, rank=8)
    sigma = {r: rng.uniform(0.5, 2.0, 8).astype(np.float32) for r in ROLES}
    # Narrower and shallower-rank target: factors cropped, σ = cropped mean.
    fresh = fresh_params(build_model(fine_model_config(hidden=16, depth=2, rank=4)), 1)
    new = init_from_fine_learngene(fresh, source, jax.random.key(2), sigma=sigma)
    for role in ROLES:
        for name in ("U", "V"):
            got, src = np.asarray(new["fine_bases"][role][name]), source["fine_bases"][role][name]
            np.testing.assert_array_equal(got, src[:got.shape[0], :4])
        for i in range(2):
            layer = new[f"block_{i}"]["attn"][role] if role in ("q", "k", "v", "attn_out") else new[f"block_{i}"][role]
            np.testing.assert_array_equal(np.asarray(layer["sigma"]), sigma[role][:4])
    fresh_flat, new_flat = leaves(fresh), leaves(new)
    assert fresh_flat.keys() == new_flat.keys()
    for k, v in fresh_flat.items():
        if not (k.startswith("fine_bases/") or k.endswith("/sigma")):
            np.testing.assert_array_equal(new_flat[k], v)   # embedders, adaLN, biases: as initialised
    # Wider, higher-rank target: copied block kept, new rows at the init scale, new columns ⟂ copied ones.
    fresh = fresh_params(build_model(fine_model_config(hidden=48, depth=1, rank=12)), 3)
    new = init_from_fine_learngene(fresh, source, jax.random.key(4), sigma=sigma)
    for role in ROLES:
        for name in ("U", "V"):
            got, src = np.asarray(new["fine_bases"][role][name]), source["fine_bases"][role][name]
            d = src.shape[0]
            np.testing.assert_array_equal(got[:d, :8], src)
            assert got.shape[0] > d and 0.5 < np.std(got[d:, :8]) * np.sqrt(got.shape[0]) < 1.5
            np.testing.assert_allclose(got[:, :8].T @ got[:, 8:], 0, atol=1e-4)
            np.testing.assert_allclose(got[:, 8:].T @ got[:, 8:], np.eye(4), atol=1e-5)
        layer = new["block_0"]["attn"][role] if role in ("q", "k", "v", "attn_out") else new["block_0"][role]
        s_fresh = fresh["block_0"]["attn"][role] if role in ("q", "k", "v", "attn_out") else fresh["block_0"][role]
        np.testing.assert_array_equal(np.asarray(layer["sigma"]),
                                      np.concatenate([sigma[role], np.asarray(s_fresh["sigma"])[8:]]))
    with pytest.raises(ConfigError, match="model.linear=ConfigDict\\(kind='fine'"):
        init_from_fine_learngene(jax.eval_shape(lambda: fresh_params(build_model(tiny_config()), 0)), source,
                                 jax.random.key(0))


def test_saved_learngene_initialises_a_deeper_narrower_model_that_trains(tmp_path):
    source_dir = str(tmp_path / "source")
    config = fine_model_config(hidden=32, depth=1, rank=8)
    config.train.update(num_steps=4, checkpoint_every=4)
    state = train(config, source_dir, evaluate=None)
    ema = jax.tree.map(np.asarray, state["ema_params"])
    learngene = load_fine_learngene(source_dir)
    assert all(is_fine_learngene(p) for p, _ in jax.tree_util.tree_leaves_with_path(learngene.bases))
    for k, v in leaves(learngene.bases).items():
        np.testing.assert_array_equal(v, leaves(extract_fine_learngene(ema))[k])
    for role, s in mean_sigma(ema).items():
        np.testing.assert_allclose(learngene.sigma[role], s)
    # Deeper (2 blocks), narrower (hidden 16) and lower rank (4), another seed.
    target = fine_model_config(hidden=16, depth=2, rank=4)
    target.train.seed = 1
    target.init.fine_learngene = source_dir
    trainer = Trainer(target, str(tmp_path / "target"))
    start = trainer.fresh_state()
    params = jax.tree.map(np.asarray, start["params"])
    for role in ROLES:
        for name in ("U", "V"):
            got, src = params["fine_bases"][role][name], ema["fine_bases"][role][name]
            np.testing.assert_array_equal(got, src[:got.shape[0], :4])
    fresh = jax.jit(lambda k: init_params(jax.random.fold_in(k, 1 << 20), trainer.model))(trainer.base_key)
    assert not np.allclose(np.asarray(fresh["fine_bases"]["q"]["U"]), params["fine_bases"]["q"]["U"])
    np.testing.assert_allclose(params["block_1"]["mlp_in"]["sigma"], learngene.sigma["mlp_in"][:4])
    state, losses = start, []
    for step in range(4):
        state, metrics = trainer.step_fn(state, trainer.global_batch(step))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    moved = np.asarray(state["params"]["fine_bases"]["q"]["U"]) - params["fine_bases"]["q"]["U"]
    assert np.abs(moved).max() > 0
    # The trainer's entry point refuses a FINE learngene for a non-FINE model, or two starts at once.
    dense = tiny_config()
    dense.init.fine_learngene = source_dir
    abstract = jax.eval_shape(lambda: fresh_params(build_model(dense), 0))
    with pytest.raises(ConfigError, match="model.linear=ConfigDict\\(kind='fine'"):
        init_from_config(dense, abstract, jax.random.key(0))
    target.init.learngene = source_dir
    with pytest.raises(ConfigError, match="init.fine_learngene and init.learngene"):
        init_from_config(target, start["params"], jax.random.key(0))
