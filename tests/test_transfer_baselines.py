"""Starting a new model from a pre-trained one: the baselines' initialisation, the layer-transfer
learngenes (Heur-LG, Auto-LG), KIND's ablations, and every method's frozen leaves staying frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_config
from kindjax import params as param_rules
from kindjax.config import ConfigError, validate
from kindjax.transfer.layer_selection import linear_cka
from kindjax.papers.kind.layer import kind_config, ungated_kind_linear
from kindjax.checkpoints.learngene import load_params
from kindjax.papers.kind.methods import METHODS, Sizes, method_config
from kindjax.models.dit import init_params
from kindjax.train.trainer import Trainer, train
from kindjax.transfer.pretrained import dense_kernel, init_from_pretrained, random_svd_backbone

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("transfer_baselines")

PRE, NOVEL = (0, 1, 2, 3, 4, 5, 6), (7, 8, 9)
SIZES = Sizes(rank=6, n_learngene=16, n_tailor=2, oft_blocks=4, num_blocks=1)


def pretrain_config(linear=None):
    c = tiny_config()
    c.model.update(hidden_size=32, num_heads=2, num_classes=len(PRE), adaln_init="gaussian")
    c.data.classes = PRE
    c.train.update(num_steps=3, checkpoint_every=3, log_every=3)
    if linear is not None:
        c.model.linear = linear
    return c


def novel_config():
    c = pretrain_config()
    c.data.classes, c.model.num_classes = NOVEL, len(NOVEL)
    c.train.update(num_steps=2, checkpoint_every=2, log_every=2)
    return c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny dense DiT and a tiny KIND DiT, each trained 3 steps on digits 0–6."""
    root = tmp_path_factory.mktemp("sources")
    train(pretrain_config(), str(root / "dense"))
    train(pretrain_config(kind_config(SIZES.n_learngene, SIZES.n_tailor)), str(root / "kind"))
    return {"dense": str(root / "dense"), "kind": str(root / "kind")}


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(param_rules.as_dict(tree)).items()}


def fresh_params(config, seed=1):
    trainer = Trainer(config, "/nonexistent", devices=jax.devices()[:1])
    return init_params(jax.random.key(seed), trainer.model)


@pytest.mark.slow  # 26 s (-n 2, 2 cores)
def test_dense_copy_keeps_shared_leaves_and_draws_new_label_rows(sources):
    source, _ = load_params(sources["dense"])
    config = novel_config()
    config.init.pretrained = sources["dense"]
    fresh = fresh_params(config)
    out, src, new = flat(init_from_pretrained(fresh, source, jax.random.key(0), config)), flat(source), flat(fresh)
    assert set(out) == set(new)
    for name, value in out.items():
        if name == "y_embedder/embedding":
            np.testing.assert_array_equal(value[-1], src[name][-1])          # null row: pre-trained
            np.testing.assert_array_equal(value[:-1], new[name][:-1])        # novel classes: fresh
            assert value.shape[0] == len(NOVEL) + 1
        else:
            np.testing.assert_array_equal(value, src[name], err_msg=name)


def test_blocks_limit_the_copy(sources):
    source, _ = load_params(sources["dense"])
    config = novel_config()
    config.init.update(pretrained=sources["dense"], blocks=(1,))
    fresh = fresh_params(config)
    out, src, new = flat(init_from_pretrained(fresh, source, jax.random.key(0), config)), flat(source), flat(fresh)
    for name, value in out.items():
        expected = new if name.startswith("block_0/") else src
        if name != "y_embedder/embedding":
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert not np.array_equal(src["block_0/attn/q/kernel"], new["block_0/attn/q/kernel"])


def test_random_svd_backbone_keeps_a_random_subset_of_singular_components():
    kernel = np.random.default_rng(0).normal(size=(12, 20)).astype(np.float32)
    cut = random_svd_backbone(kernel, 5, jax.random.key(3))
    s_full = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
    s_cut = np.linalg.svd(cut.astype(np.float64), compute_uv=False)
    assert np.sum(s_cut > 1e-4 * s_full[0]) == 5
    kept = s_cut[:5]
    assert all(np.min(np.abs(s_full - v)) < 1e-4 * s_full[0] for v in kept)
    assert not np.allclose(kept, s_full[:5])   # not simply the top 5 (random subset for this key)
    # Kept components are the source's: the residual is orthogonal to the cut.
    assert abs(float(np.sum((kernel - cut) * cut))) < 1e-3 * float(np.sum(kernel * kernel))
    with pytest.raises(ConfigError, match="init.svd_components=13"):
        random_svd_backbone(kernel, 13, jax.random.key(0))


def test_kernel_from_kind_learngene_is_the_float64_product():
    rng = np.random.default_rng(1)
    node = {"learngene": {"U": rng.normal(size=(9, 4)), "sigma": rng.uniform(0.5, 2, 4), "V": rng.normal(size=(7, 4))},
            "bias": np.zeros(9)}
    expected = sum(node["learngene"]["sigma"][i] * np.outer(node["learngene"]["V"][:, i], node["learngene"]["U"][:, i])
                   for i in range(4))
    np.testing.assert_allclose(dense_kernel(node), expected, rtol=1e-5)


def test_shape_clash_is_a_clear_error(sources):
    source, _ = load_params(sources["dense"])
    config = novel_config()
    config.model.hidden_size = 64
    config.init.pretrained = sources["dense"]
    with pytest.raises(ConfigError, match="x_embedder/kernel has shape .* in the pre-trained model"):
        init_from_pretrained(fresh_params(config), source, jax.random.key(0), config)


def test_init_options_are_validated():
    config = novel_config()
    config.init.update(select="heur_lg", num_blocks=1)
    with pytest.raises(ConfigError, match="need init.pretrained"):
        validate(config, 1)
    config.init.update(pretrained="a", learngene="b")
    with pytest.raises(ConfigError, match="set one of them"):
        validate(config, 1)


def test_linear_cka_matches_float64_formula_and_invariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    ac, bc = a - a.mean(0), b - b.mean(0)
    hsic = lambda x, y: np.trace(x @ x.T @ y @ y.T)   # noqa: E731  (the kernel form of the same quantity)
    expected = hsic(ac, bc) / np.sqrt(hsic(ac, ac) * hsic(bc, bc))
    np.testing.assert_allclose(float(linear_cka(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))),
                               expected, rtol=1e-4)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(float(linear_cka(jnp.asarray(a), jnp.asarray(3 * a @ q))), 1.0, rtol=1e-5)


def test_ungated_kind_layer_equals_float64_formula():
    rng = np.random.default_rng(3)
    d_in, d_out, n_g, n_cls, n_t = 6, 5, 2, 3, 1
    lg = {"U": rng.normal(size=(d_out, n_g)), "sigma": rng.uniform(0.5, 2, n_g), "V": rng.normal(size=(d_in, n_g))}
    tl = {"U": rng.normal(size=(n_cls, d_out, n_t)), "sigma": rng.uniform(0.5, 2, (n_cls, n_t)),
          "V": rng.normal(size=(n_cls, d_in, n_t))}
    bias, x, y = rng.normal(size=d_out), rng.normal(size=(4, 3, d_in)), np.asarray([0, 1, 2, 3])
    w = (lg["V"] * lg["sigma"]) @ lg["U"].T + sum((tl["V"][c] * tl["sigma"][c]) @ tl["U"][c].T for c in range(n_cls))
    f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)   # noqa: E731
    out = ungated_kind_linear(f32(x), jnp.asarray(y), f32(lg), f32(tl), f32(bias))
    np.testing.assert_allclose(np.asarray(out), x @ w + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m if m in ("kind", "lora") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(METHODS)])   # 15 s each: two in the default run
def test_each_method_trains_only_its_trainable_leaves(sources, method, tmp_path):
    """Two steps of every method from the pre-trained sources: leaves outside ``train.trainable``
    (and the frozen learngene) are bit-identical, and some trainable leaf moved."""
    config = method_config(novel_config(), method, SIZES, pretrained=sources["dense"], learngene=sources["kind"])
    validate(config, 1)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    state = trainer.fresh_state()
    before = flat(state["params"])
    for step in range(2):
        state, metrics = trainer.step_fn(state, trainer.global_batch(step))
        assert np.isfinite(float(metrics["loss"]))
    after = flat(state["params"])
    trainable = param_rules.update_rule(config).trainable
    paths = {"/".join(param_rules.path_names(p)): p for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
    frozen = [n for n in after if not trainable(paths[n])]
    moved = [n for n in after if trainable(paths[n]) and not np.array_equal(after[n], before[n])]
    for name in frozen:
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{method}: frozen {name} moved")
    assert moved, f"{method}: no trainable leaf moved"
    if METHODS[method].trainable != (".*",) or config.train.freeze_learngene:
        assert frozen, f"{method} froze nothing"


def test_difffit_residual_scales_start_at_one_and_scale_the_branches():
    from kindjax.models.dit import build_model

    config = novel_config()
    plain = build_model(config)
    config.model.residual_scales = True
    scaled = build_model(config)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    t, y = jnp.asarray([3, 700]), jnp.asarray([0, 2])
    params = scaled.init(jax.random.key(0), x, t, y)["params"]
    assert params["block_0"]["gamma_attn"].shape == (32,)
    np.testing.assert_array_equal(params["block_1"]["gamma_mlp"], np.ones(32))
    without = {k: ({n: v for n, v in b.items() if not n.startswith("gamma_")} if k.startswith("block_") else b)
               for k, b in params.items()}
    # adaLN-Gaussian, so the residual branches are live: γ = 1 changes nothing ...
    np.testing.assert_array_equal(scaled.apply({"params": params}, x, t, y), plain.apply({"params": without}, x, t, y))
    # ... γ = 0 on every branch leaves only the identity path: the output of a zero-depth DiT.
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "gamma_" in param_rules.path_string(p) else v, params)
    out_zero = scaled.apply({"params": zeroed}, x, t, y)
    config.model.depth = 0
    np.testing.assert_allclose(out_zero, build_model(config).apply({"params": without}, x, t, y), atol=1e-6)
