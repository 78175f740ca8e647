"""FINE: one shared U, V per role fed by every block (both layouts), the layer against a float64 oracle,
its init scale, the materialized dense DiT, drop path, the learngene initialising DiTs of other depths
(Σ rules, width/rank extension), the Σ-only stage of job="fine_init", and the per-layer SVD ablation."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from kindjax import params as param_rules
from kindjax.config import ConfigError
from kindjax.papers.fine import transfer as fine_transfer
from kindjax.papers.fine.transfer import (extract_fine_learngene, init_from_config, init_from_fine_learngene, is_fine_learngene,
                                   is_layer_sigma, layer_sigmas, load_fine_learngene, materialize, mean_sigma)
from kindjax.layers.dense import DenseLinear
from kindjax.papers.fine.layer import LAYOUTS, FineLinear, fine_config, init_bases
from kindjax.layers.svd import init_sigma
from kindjax.models.dit import build_model
from kindjax.models.dit import init_params
from kindjax.train.trainer import Trainer, train


def fine_model_config(hidden=32, depth=3, rank=8, heads=2, layout="paper"):
    config = tiny_config()
    config.model.update(hidden_size=hidden, depth=depth, num_heads=heads, linear=fine_config(rank, layout))
    return config


def layer_path(block, role):
    """Where a role's layer sits in block ``block``."""
    if role in ("q", "k", "v", "qkv", "attn_out"):
        return f"block_{block}/attn/{role}"
    return f"block_{block}/adaln_modulation" if role == "adaln" else f"block_{block}/{role}"


def node(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def perturbed(params, seed, scale=0.3):
    """``params`` plus Gaussian noise on every leaf (gates, final layer, Σ, biases: no zero left)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(v + scale * rng.standard_normal(v.shape).astype(np.float32)), params)


def fresh_params(model, seed):
    return jax.jit(lambda key: init_params(key, model))(jax.random.key(seed))


def leaves(tree):
    return {param_rules.path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def dit_inputs(key, batch=4):
    kx, kt, ky = jax.random.split(key, 3)
    return (jax.random.normal(kx, (batch, 8, 8, 1)), jax.random.randint(kt, (batch,), 0, 1000),
            jax.random.randint(ky, (batch,), 0, 11))


@pytest.mark.slow  # 21 s (-n 2, 2 cores)
@pytest.mark.parametrize("layout", ["per_role", "paper"])
def test_shared_factor_is_one_array_per_role_and_every_block_feeds_its_gradient(layout):
    depth = 3
    model = build_model(fine_model_config(depth=depth, layout=layout))
    x, t, y = dit_inputs(jax.random.key(0))
    params = fresh_params(model, 1)
    flat = leaves(params)
    roles = LAYOUTS[layout]
    # One U and one V per role in the whole tree, under fine_bases; the blocks own only σ and b
    # ("paper": qkv fused d→3d, adaLN d→6d factorized; "per_role": q, k, v apart, adaLN dense).
    assert sorted(k for k in flat if k.endswith("/U")) == [f"fine_bases/{r}/U" for r in sorted(roles)]
    assert sorted(k for k in flat if k.endswith("/V")) == [f"fine_bases/{r}/V" for r in sorted(roles)]
    assert (flat["fine_bases/qkv/U"].shape == (96, 8)) if layout == "paper" else "block_0/adaln_modulation/kernel" in flat
    for i in range(depth):
        for role in roles:
            prefix = layer_path(i, role)
            assert sorted(k for k in flat if k.startswith(prefix + "/")) == [prefix + "/bias", prefix + "/sigma"]
    if layout == "per_role":
        return
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
    config.model.linear = fine_config(8, layout="fused")
    with pytest.raises(ConfigError, match="linear.layout='fused' .*'paper'.*'per_role'"):
        build_model(config)
    layer = FineLinear(features=4, bases=None)
    with pytest.raises(ValueError, match="needs the shared factors"):
        layer.init(jax.random.key(0), jnp.ones((1, 4)))




def dense_twin(config):
    dense = config.copy_and_resolve_references()
    dense.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    return dense


@pytest.mark.slow  # 18 s (-n 2, 2 cores)
@pytest.mark.parametrize("layout", ["paper", "per_role"])
def test_materialized_dense_dit_equals_the_factorized_one(layout):
    """``W_l = U diag(σ_l) Vᵀ`` built into the dense DiT's kernels (qkv split into q, k, v; the adaLN
    matrix) gives the FINE DiT's output on random inputs, with random Σ and every other leaf random."""
    config = fine_model_config(depth=2, layout=layout)
    fine_model, dense_model = build_model(config), build_model(dense_twin(config))
    params = perturbed(fresh_params(fine_model, 0), 1, scale=0.05)
    dense = materialize(params, fresh_params(dense_model, 2))
    assert "fine_bases" not in dense and dense["block_1"]["attn"]["k"]["kernel"].shape == (32, 32)
    x, t, y = dit_inputs(jax.random.key(3))
    want = np.asarray(fine_model.apply({"params": params}, x, t, y))
    got = np.asarray(dense_model.apply({"params": dense}, x, t, y))
    assert np.abs(want).max() > 0.1 and np.abs(want - np.asarray(fine_model.apply(
        {"params": perturbed(params, 4, scale=0.01)}, x, t, y))).max() > 1e-3   # the Σ, U, V matter
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_adaln_matrix_starts_as_the_dense_init():
    """adaLN-Zero: zero gate rows (the test below); adaLN-Gaussian: entry std s."""
    config = fine_model_config(hidden=64, rank=32, heads=2)
    config.model.update(adaln_init="gaussian", adaln_std=(1e-3,))
    params = fresh_params(build_model(config), 0)
    b, s = params["fine_bases"]["adaln"], params["block_1"]["adaln_modulation"]["sigma"]
    w = np.asarray((b["V"] * s) @ b["U"].T)
    assert w.shape == (64, 384) and w.std() == pytest.approx(1e-3, rel=0.05)


def test_drop_path_keeps_each_sample_with_probability_one_minus_p_and_the_mean():
    """Statistical: N = 200,000 samples; the survival rate's std is √(p(1−p)/N) ≈ 0.0011, the tolerance
    0.006 (> 5σ); the mean's std is √(p/(1−p)/N) ≤ 0.0023, the tolerance 0.012."""
    from kindjax.models.dit import drop_path

    for p in (0.1, 0.5):
        out = np.asarray(drop_path(jax.random.key(int(p * 10)), jnp.ones((200_000, 3, 2)), p))
        per_sample = out.reshape(out.shape[0], -1)
        assert np.all(per_sample == per_sample[:, :1])                # one draw per sample
        np.testing.assert_allclose(np.unique(out), [0.0, 1 / (1 - p)], rtol=1e-6)
        assert abs((per_sample[:, 0] > 0).mean() - (1 - p)) < 0.006
        assert abs(out.mean() - 1.0) < 0.012


@pytest.mark.slow  # 34 s (-n 2, 2 cores)
def test_drop_path_in_the_dit_is_off_without_rng_and_drops_whole_blocks_in_training():
    config = fine_model_config(depth=1)
    config.model.drop_path = 0.5
    model, plain = build_model(config), build_model(fine_model_config(depth=1))
    params = perturbed(fresh_params(plain, 0), 1)
    x, t, y = dit_inputs(jax.random.key(2), batch=1)
    n = 1000
    x, t, y = (jnp.repeat(a, n, axis=0) for a in (x, t, y))
    # Evaluation and sampling pass no 'dropout' rng: deterministic, the rate-0 model's output.
    off = np.asarray(model.apply({"params": params}, x[:8], t[:8], y[:8]))
    np.testing.assert_array_equal(off, np.asarray(plain.apply({"params": params}, x[:8], t[:8], y[:8])))
    # Training: a sample skips the block entirely with probability p² (both branches dropped):
    # then its output is the 0-block DiT's.  Std of the rate √(p²(1−p²)/n) ≈ 0.0137, tolerance 0.07 (5σ).
    out = np.asarray(model.apply({"params": params}, x, t, y, rngs={"dropout": jax.random.key(5)}))
    empty = dict(params)
    del empty["block_0"]
    skipped_out = np.asarray(build_model(fine_model_config(depth=0)).apply({"params": empty}, x[:1], t[:1], y[:1]))
    # (outputs ~35 in size; the four outcomes differ by > 0.05)
    skipped = np.all(np.abs(out - skipped_out) < 1e-3, axis=(1, 2, 3))
    kept = np.all(np.abs(out - off[:1]) < 1e-3, axis=(1, 2, 3))
    assert abs(skipped.mean() - 0.25) < 0.07 and kept.mean() == 0   # both kept: branches scaled by 2
    # The scan over blocks draws the same masks as the loop.
    config.model.depth, config.model.scan_blocks = 1, True
    scanned = np.asarray(build_model(config).apply({"params": params}, x[:64], t[:64], y[:64],
                                                   rngs={"dropout": jax.random.key(5)}))
    looped = np.asarray(model.apply({"params": params}, x[:64], t[:64], y[:64], rngs={"dropout": jax.random.key(5)}))
    np.testing.assert_allclose(scanned, looped, atol=1e-3)   # rounding (outputs ~20); another mask: > 0.05


@pytest.mark.slow  # 42 s (-n 2, 2 cores)
def test_trainer_draws_drop_path_from_the_step_key_only_when_the_rate_is_set(tmp_path):
    config = fine_model_config(depth=2)
    config.model.drop_path = 0.5
    trainer = Trainer(config, str(tmp_path / "a"))
    state = trainer.fresh_state()
    batch = trainer.global_batch(0)
    keep = jax.tree.map(np.asarray, state)
    keep["params"] = jax.tree.map(np.asarray, perturbed(keep["params"], 0, scale=0.05))   # open the adaLN gates
    _, m1 = trainer.step_fn(jax.tree.map(jnp.asarray, keep), batch)
    _, m2 = trainer.step_fn(jax.tree.map(jnp.asarray, keep), batch)
    assert float(m1["loss"]) == float(m2["loss"])           # a pure function of (seed, step): resume-exact
    config.model.drop_path = 0.0
    plain = Trainer(config, str(tmp_path / "b"))
    _, m0 = plain.step_fn(jax.tree.map(jnp.asarray, keep), batch)
    assert float(m0["loss"]) != float(m1["loss"])


def source_fine_params(depth=3, layout="paper", seed=0):
    """A trained-looking FINE source: every leaf random (factors not orthonormal, Σ differ per layer)."""
    return jax.tree.map(np.asarray, perturbed(fresh_params(build_model(fine_model_config(depth=depth, layout=layout)),
                                                           seed), seed + 1))


@pytest.mark.slow  # 14 s (-n 2, 2 cores)
@pytest.mark.parametrize("rule", ["identical", "linear", "random", "trained", "copy"])
def test_sigma_rules_set_the_new_layers(rule):
    source = source_fine_params(depth=3)
    depth = 3 if rule == "copy" else 5
    fresh = fresh_params(build_model(fine_model_config(depth=depth)), 7)
    new = jax.tree.map(np.asarray, init_from_fine_learngene(fresh, source, jax.random.key(1), rule))
    # U, V copied exactly (same width and rank: the paper's recipe); outside the blocks: the source's.
    for role, f in source["fine_bases"].items():
        for name in ("U", "V"):
            np.testing.assert_array_equal(new["fine_bases"][role][name], f[name])
    for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):
        for k, v in leaves(source[name]).items():
            np.testing.assert_array_equal(leaves(new[name])[k], v)
    src, got = layer_sigmas(source), layer_sigmas(new)
    assert set(got) == set(LAYOUTS["paper"]) and got["qkv"].shape == (depth, 8)
    for role in src:
        s, g = src[role], got[role]
        if rule == "identical":
            np.testing.assert_allclose(g, np.repeat(s.mean(0, keepdims=True), depth, 0), rtol=1e-6)
        elif rule == "linear":
            np.testing.assert_allclose(g[0], s[0], rtol=1e-6)
            np.testing.assert_allclose(g[-1], s[-1], rtol=1e-6)
            np.testing.assert_allclose(g[2], (s[0] + s[-1]) / 2, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.diff(g, 2, axis=0), 0, atol=1e-5)   # evenly spaced
        elif rule == "copy":
            np.testing.assert_array_equal(g, s)
        else:   # random: |z|·RMS(source Σ): non-negative, the source's scale, different per layer
            assert np.all(g >= 0) and not np.allclose(g[0], g[1])
            assert 0.5 < np.sqrt(np.mean(g ** 2)) / np.sqrt(np.mean(s ** 2)) < 1.5
    # Biases: the source's mean over its blocks ("copy": each block's own).
    b = np.stack([source[f"block_{i}"]["mlp_in"]["bias"] for i in range(3)])
    want = b[1] if rule == "copy" else b.mean(0)
    np.testing.assert_allclose(new["block_1"]["mlp_in"]["bias"], want, rtol=1e-6)
    if rule != "copy":
        with pytest.raises(ConfigError, match="'copy' keeps each source layer's Σ: the source has 3 blocks"):
            init_from_fine_learngene(fresh, source, jax.random.key(1), "copy")


@pytest.mark.slow  # 17 s (-n 2, 2 cores)
def test_width_and_rank_crop_and_extend_as_our_extension():
    source = source_fine_params(depth=2, layout="per_role")
    # Narrower and lower-rank target: factors cropped, σ = cropped mean; leaves of other shapes fresh.
    fresh = fresh_params(build_model(fine_model_config(hidden=16, depth=2, rank=4, layout="per_role")), 1)
    new = init_from_fine_learngene(fresh, source, jax.random.key(2))
    mean = mean_sigma(source)
    for role in LAYOUTS["per_role"]:
        for name in ("U", "V"):
            got, src = np.asarray(new["fine_bases"][role][name]), source["fine_bases"][role][name]
            np.testing.assert_array_equal(got, src[:got.shape[0], :4])
        np.testing.assert_allclose(np.asarray(node(new, layer_path(1, role))["sigma"]), mean[role][:4], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["x_embedder"]["kernel"]), np.asarray(fresh["x_embedder"]["kernel"]))
    # Wider, higher-rank target: copied block kept, new rows at the init scale, new columns ⟂ copied ones.
    fresh = fresh_params(build_model(fine_model_config(hidden=48, depth=1, rank=12, layout="per_role")), 3)
    new = init_from_fine_learngene(fresh, source, jax.random.key(4))
    for role in LAYOUTS["per_role"]:
        for name in ("U", "V"):
            got, src = np.asarray(new["fine_bases"][role][name]), source["fine_bases"][role][name]
            d = src.shape[0]
            np.testing.assert_array_equal(got[:d, :8], src)
            assert got.shape[0] > d and 0.5 < np.std(got[d:, :8]) * np.sqrt(got.shape[0]) < 1.5
            np.testing.assert_allclose(got[:, :8].T @ got[:, 8:], 0, atol=1e-4)
            np.testing.assert_allclose(got[:, 8:].T @ got[:, 8:], np.eye(4), atol=1e-5)
    with pytest.raises(ConfigError, match="model.linear=ConfigDict\\(kind='fine'"):
        init_from_fine_learngene(jax.eval_shape(lambda: fresh_params(build_model(tiny_config()), 0)), source,
                                 jax.random.key(0))
    with pytest.raises(ValueError, match="no shared factors for roles .*another model.linear.layout"):
        init_from_fine_learngene(fresh_params(build_model(fine_model_config(depth=1)), 0), source, jax.random.key(0))


@pytest.mark.slow  # 53 s (-n 2, 2 cores)
def test_saved_learngene_initialises_a_deeper_model_and_a_materialized_dense_one(tmp_path):
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
    # Deeper (3 blocks), another seed, "linear" Σ (one source layer: every layer its Σ).
    target = fine_model_config(hidden=32, depth=3, rank=8)
    target.train.seed = 1
    target.init.update(fine_learngene=source_dir, fine_sigma="linear")
    trainer = Trainer(target, str(tmp_path / "target"))
    start = trainer.fresh_state()
    params = jax.tree.map(np.asarray, start["params"])
    for role in LAYOUTS["paper"]:
        for name in ("U", "V"):
            np.testing.assert_array_equal(params["fine_bases"][role][name], ema["fine_bases"][role][name])
    np.testing.assert_allclose(params["block_2"]["adaln_modulation"]["sigma"], learngene.sigma["adaln"])
    state, metrics = trainer.step_fn(start, trainer.global_batch(0))
    assert np.isfinite(float(metrics["loss"]))
    # A dense target of the learngene's size: the FINE init, materialized.
    dense = dense_twin(target)
    dense.init.fine_sigma = "copy"
    dense.model.depth = 1
    fresh = fresh_params(build_model(dense), 0)
    got = init_from_config(dense, fresh, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(got["block_0"]["mlp_out"]["kernel"]),
                               (ema["fine_bases"]["mlp_out"]["V"] * ema["block_0"]["mlp_out"]["sigma"])
                               @ ema["fine_bases"]["mlp_out"]["U"].T, rtol=1e-5, atol=1e-6)
    # The trainer's entry point refuses a FINE learngene for a KIND model, or two starts at once.
    kind = fine_model_config(hidden=32, depth=1)
    kind.model.linear = ml_collections.ConfigDict(dict(kind="kind", n_learngene=16, n_tailor=1))
    kind.init.fine_learngene = source_dir
    abstract = jax.eval_shape(lambda: fresh_params(build_model(kind), 0))
    with pytest.raises(ConfigError, match="model.linear=ConfigDict\\(kind='fine'"):
        init_from_config(kind, abstract, jax.random.key(0))
    target.init.learngene = source_dir
    with pytest.raises(ConfigError, match="init.fine_learngene and init.learngene"):
        init_from_config(target, start["params"], jax.random.key(0))


def test_sigma_only_update_rule_keeps_u_v_and_the_rest_bit_identical(tmp_path):
    """The Σ-only stage's ``train.trainable`` (:data:`kindjax.papers.fine.jobs.SIGMA_ONLY`): after steps, U, V and every
    non-Σ leaf are bit-identical, and Σ moved (random non-trivial start: every leaf perturbed)."""
    from kindjax.papers.fine.jobs import SIGMA_ONLY
    from kindjax.train.trainer import state_from_params

    config = fine_model_config(depth=2)
    config.train.trainable = SIGMA_ONLY
    config.optim.lr = 1e-2
    trainer = Trainer(config, str(tmp_path))
    start = jax.tree.map(np.asarray, perturbed(fresh_params(trainer.model, 0), 1, scale=0.05))
    state = state_from_params(jax.tree.map(jnp.asarray, start), trainer.optimizer)
    for step in range(3):
        state, _ = trainer.step_fn(state, trainer.global_batch(step))
    after = leaves(state["params"])
    moved = [k for k, v in leaves(start).items() if not np.array_equal(after[k], v)]
    assert moved and all(k.endswith("/sigma") for k in moved)
    assert len(moved) == 2 * len(LAYOUTS["paper"])        # every layer's Σ moved
    assert all(np.array_equal(after[k], v) for k, v in leaves(start).items() if "fine_bases" in k)


def test_fine_init_job_stage_configs(tmp_path):
    from kindjax.papers.fine.jobs import SIGMA_ONLY, fine_init_configs

    config = fine_model_config(depth=5)
    config.job = "fine_init"
    config.init.update(fine_learngene="/src", fine_sigma="trained", sigma_steps=30, sigma_lr=3e-3)
    sigma, main = fine_init_configs(config, "/job")
    assert tuple(sigma.train.trainable) == SIGMA_ONLY and sigma.train.num_steps == 30 and sigma.optim.lr == 3e-3
    assert (sigma.init.fine_sigma, sigma.train.ema_decay, sigma.job) == ("random", 0.0, "train")
    assert (main.init.fine_learngene, main.init.fine_sigma, main.model.linear.kind) == ("/job/sigma", "copy", "dense")
    assert main.train.num_steps == config.train.num_steps and tuple(main.train.trainable) == (".*",)
    config.init.update(fine_sigma="linear", materialize=False)
    sigma, main = fine_init_configs(config, "/job")
    assert sigma is None and main.init.fine_learngene == "/src" and main.model.linear.kind == "fine"
    config.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    with pytest.raises(ConfigError, match="job='fine_init' .*kind='fine'"):
        fine_init_configs(config, "/job")


@pytest.mark.slow
def test_fine_init_job_trains_only_sigma_then_everything(tmp_path):
    """job="fine_init": the Σ-only stage keeps U, V (and every other leaf) bit-identical while Σ moves;
    then the materialized dense model trains (all leaves), starting from the Σ stage's result."""
    from kindjax.checkpoints.learngene import load_params
    from kindjax.papers.fine.jobs import run_fine_init

    source_dir = str(tmp_path / "source")
    config = fine_model_config(hidden=32, depth=2, rank=8)
    config.train.update(num_steps=2, checkpoint_every=2)
    train(config, source_dir, evaluate=None)
    target = fine_model_config(hidden=32, depth=3, rank=8)
    target.job = "fine_init"
    target.train.update(num_steps=2, checkpoint_every=2)
    target.init.update(fine_learngene=source_dir, fine_sigma="trained", sigma_steps=3, sigma_lr=1e-2,
                       sigma_batches=2, materialize=True)
    target.data.name = "digits"
    run_fine_init(target, str(tmp_path / "job"))
    source, _ = load_params(source_dir)
    sigma_stage = str(tmp_path / "job" / "sigma")
    after, sigma_config = load_params(sigma_stage, ema=False)
    assert sigma_config.train.trainable == ["/sigma$"] and sigma_config.train.num_steps == 3
    for role, f in source["fine_bases"].items():     # U, V: the learngene's, bit-identical after the stage
        for name in ("U", "V"):
            np.testing.assert_array_equal(np.asarray(after["fine_bases"][role][name]), np.asarray(f[name]))
    # Every non-Σ leaf is what the initialisation gave it (the source's blocks' mean, or its own leaf).
    np.testing.assert_array_equal(np.asarray(after["final_layer"]["linear"]["kernel"]),
                                  np.asarray(source["final_layer"]["linear"]["kernel"]))
    mean_bias = np.mean([np.asarray(source[f"block_{i}"]["attn"]["qkv"]["bias"]) for i in range(2)], axis=0)
    np.testing.assert_array_equal(np.asarray(after["block_2"]["attn"]["qkv"]["bias"]), mean_bias.astype(np.float32))
    # Σ moved from its random draw (redrawn here with the same key as the stage's init).
    fresh_model = build_model(fine_model_config(hidden=32, depth=3, rank=8))
    key = jax.random.fold_in(jax.random.key(0), 1 << 20)
    drawn = init_from_fine_learngene(fresh_params(fresh_model, 0), jax.tree.map(np.asarray, source),
                                     jax.random.fold_in(key, 1), "random")
    moved = np.abs(layer_sigmas(after)["mlp_in"] - layer_sigmas(drawn)["mlp_in"])
    assert moved.max() > 1e-3
    # The training stage: a dense DiT of depth 3 that trained from the materialized Σ-stage model.
    final, main_config = load_params(str(tmp_path / "job" / "train"), ema=False)
    assert main_config.model.linear.kind == "dense" and "fine_bases" not in final
    assert main_config.init.fine_sigma == "copy" and main_config.init.fine_learngene == sigma_stage
    assert final["block_2"]["attn"]["q"]["kernel"].shape == (32, 32)
    metrics = json.load(open(tmp_path / "job" / "metrics.json"))
    assert metrics["step"] == 2 and "frechet_distance" in metrics


def test_per_layer_svd_ablation_cuts_each_layer_to_its_own_top_singular_components(monkeypatch):
    dense = tiny_config()
    dense.model.update(hidden_size=32, depth=4, num_heads=2)
    source = jax.tree.map(np.asarray, perturbed(fresh_params(build_model(dense), 0), 1))
    monkeypatch.setattr(fine_transfer, "load_params", lambda path: (source, dense))
    target = tiny_config()
    target.model.update(hidden_size=32, depth=2, num_heads=2)
    target.init.update(pretrained="/dense", svd_rank=5)
    from kindjax.transfer import initial_params

    new = jax.tree.map(np.asarray, initial_params(target, fresh_params(build_model(target), 2), jax.random.key(0)))
    for block, src in ((0, 0), (1, 3)):                   # evenly spaced: the first and the last source block
        for layer in ("attn/q", "attn/attn_out", "mlp_in", "adaln_modulation"):
            path = layer.split("/")
            got, w = new[f"block_{block}"], source[f"block_{src}"]
            for name in path:
                got, w = got[name], w[name]
            p, s, qt = np.linalg.svd(w["kernel"].astype(np.float64))
            np.testing.assert_allclose(got["kernel"], (p[:, :5] * s[:5]) @ qt[:5], rtol=1e-4, atol=1e-5)
            assert np.linalg.matrix_rank(got["kernel"], tol=1e-4) == 5
            np.testing.assert_array_equal(got["bias"], w["bias"])
    np.testing.assert_array_equal(new["x_embedder"]["kernel"], source["x_embedder"]["kernel"])
    target.init.svd_rank = 33
    with pytest.raises(ConfigError, match="init.svd_rank=33 must be in \\[1, 32\\]"):
        initial_params(target, fresh_params(build_model(target), 2), jax.random.key(0))


@pytest.mark.parametrize("arch, rank, hidden", [("b", 100, 768), ("l", 148, 1024)])
def test_imagenet_fine_configs_have_table_7_and_build(arch, rank, hidden):
    import importlib

    from kindjax.config import validate
    from kindjax.models.dit import abstract_params

    pre = importlib.import_module(f"configs.fine_dit_{arch}").get_config()
    assert (pre.train.batch_size, pre.train.num_steps, pre.optim.lr, pre.optim.weight_decay) == (64, 300_000, 1e-4, 0)
    assert (pre.model.linear.rank, pre.model.linear.layout, pre.model.drop_path, pre.model.dtype) == \
        (rank, "paper", 0.5, "bfloat16")
    validate(pre, 8)
    tree = abstract_params(build_model(pre))
    assert tree["fine_bases"]["qkv"]["U"].shape == (3 * hidden, rank)
    assert tree["fine_bases"]["adaln"]["U"].shape == (6 * hidden, rank)
    get = importlib.import_module(f"configs.fine_init_dit_{arch}").get_config
    for depth in (4, 6, 8, 10, 12):
        config = get(f"depth_{depth}")
        assert (config.job, config.init.fine_sigma, config.train.num_steps) == ("fine_init", "trained", 100_000)
        config.init.fine_learngene = "/pretrain"
        validate(config, 8)
        tree = abstract_params(build_model(config))
        assert sum(k.startswith("block_") for k in tree) == depth and tree["fine_bases"]["mlp_in"]["U"].shape[1] == rank
    for rule in ("random", "identical", "linear"):
        assert get(f"depth_6,{rule}").init.fine_sigma == rule
    svd = get("depth_6,per_layer_svd")
    assert (svd.job, svd.model.linear.kind, svd.init.svd_rank) == ("train", "dense", rank)
    with pytest.raises(ConfigError, match="init.svd_rank .*needs init.pretrained"):
        validate(svd, 8)
    with pytest.raises(ValueError, match="unknown rule 'lineer'"):
        get("depth_6,lineer")
    with pytest.raises(ValueError, match="use depth_D"):
        get("L6")


@pytest.mark.slow  # 26 s (-n 2, 2 cores)
def test_adaln_zero_factorized_adaln_starts_with_zero_gates_and_trainable_factors():
    """Under adaLN-Zero the factorized adaLN matrix W_l = U·diag(σ_l)·Vᵀ has its gate rows exactly 0
    (every block starts as the identity) while σ_l is at the xavier-matching value: the loss's gradient
    reaches U's gate rows at step 0 (as a dense adaLN-Zero matrix's gate rows), and V once they moved
    (with σ = 0, neither U nor V would ever get one)."""
    config = fine_model_config(hidden=32, depth=2, rank=8)
    model = build_model(config)
    params = init_params(jax.random.key(0), model)
    bases = params["fine_bases"]["adaln"]
    sigma = params["block_0"]["adaln_modulation"]["sigma"]
    np.testing.assert_allclose(np.asarray(sigma), init_sigma(32, 6 * 32, 8))
    w = np.asarray(bases["U"] * sigma) @ np.asarray(bases["V"]).T        # (6d, d)
    rows = np.split(w, 6, axis=0)
    assert all(np.all(rows[i] == 0) for i in (2, 5))                     # gates α_msa, α_mlp
    assert all(np.abs(rows[i]).max() > 1e-3 for i in (0, 1, 3, 4))      # shift, scale
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t, y = jnp.array([3, 700]), jnp.array([1, 4])
    params["final_layer"] = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape),
                                         params["final_layer"])

    def loss(p):
        out = model.apply({"params": p}, x, t, y)
        return jnp.sum(out * jax.random.normal(jax.random.key(2), out.shape))

    grad_u = np.asarray(jax.grad(loss)(params)["fine_bases"]["adaln"]["U"])
    assert all(np.abs(np.split(grad_u, 6)[i]).max() > 0 for i in (2, 5))
    params["fine_bases"]["adaln"]["U"] = bases["U"] - 0.1 * grad_u
    assert float(jnp.abs(jax.grad(loss)(params)["fine_bases"]["adaln"]["V"]).max()) > 0
