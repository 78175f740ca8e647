"""The papers' settings that a run at scale needs to be comparable with their tables (docs/reproduce.md),
each against an independent reference: PyTorch's initialisers, a float64 formula, a hand count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from conftest import tiny_config
from kindjax.config import ConfigError, base_config, validate
from kindjax.layers import make_linear_factory
from kindjax.models.dit import build_model, init_params


def dit_params(hidden: int, qkv_init: str, linear=None, num_classes: int = 10,
               roles: tuple[str, ...] = ("q", "k", "v", "attn_out")) -> dict:
    """Fresh parameters of attention matrices (``roles``), as the DiT's linear factory makes them."""
    config = tiny_config()
    config.model.update(hidden_size=hidden, depth=1, num_heads=2, qkv_init=qkv_init, num_classes=num_classes)
    if linear is not None:
        config.model.linear = linear
    make = make_linear_factory(config.model)
    x, y = jnp.ones((1, 1, hidden)), jnp.zeros((1,), jnp.int32)
    keys = jax.random.split(jax.random.key(0), len(roles))
    return {role: make(role, hidden, role).init(key, x, y)["params"] for role, key in zip(roles, keys)}


def torch_fused_qkv(d: int, seed: int = 0) -> np.ndarray:
    """DiT's ``nn.Linear(d, 3d)`` weight ``(3d, d)`` after ``torch.nn.init.xavier_uniform_``."""
    torch.manual_seed(seed)
    weight = torch.empty(3 * d, d, dtype=torch.float64)
    torch.nn.init.xavier_uniform_(weight)
    return weight.numpy()


def test_dense_qkv_start_as_thirds_of_dits_fused_xavier_matrix(d=256):
    attn = dit_params(d, "fused")
    ours = np.concatenate([np.asarray(attn[r]["kernel"]).T for r in ("q", "k", "v")])   # (3d, d), torch's layout
    ref = torch_fused_qkv(d)
    bound = np.sqrt(6.0 / sum(torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(3 * d, d))))   # torch's a
    assert bound * 0.99 < np.abs(ours).max() <= bound * (1 + 1e-6)
    assert ours.var() == pytest.approx(ref.var(), rel=0.03) and ref.var() == pytest.approx(1 / (2 * d), rel=0.03)
    assert scipy.stats.ks_2samp(ours.ravel(), ref.ravel()).pvalue > 1e-3
    # "separate" is the other setting: d→d xavier, twice the variance, not DiT's distribution.
    separate = dit_params(d, "separate")
    kernel = np.asarray(separate["q"]["kernel"])
    torch.manual_seed(1)
    square = torch.nn.init.xavier_uniform_(torch.empty(d, d, dtype=torch.float64)).numpy()
    assert kernel.var() == pytest.approx(square.var(), rel=0.03) and kernel.var() == pytest.approx(1 / d, rel=0.03)
    assert scipy.stats.ks_2samp(kernel.ravel(), ref.ravel()).pvalue < 1e-6
    # The other matrices are their own xavier matrices under both settings.
    for params in (attn, separate):
        out = np.asarray(params["attn_out"]["kernel"])
        assert out.var() == pytest.approx(1 / d, rel=0.03)


def test_kind_matched_sigma_follows_dits_fused_qkv_variance():
    """KIND's σ gives ‖W_c‖_F² the expected value of the dense DiT's matrix (the torch draw's)."""
    from kindjax.papers.kind.layer import kind_config

    d, n_g, n_t, n_cls = 32, 12, 2, 10
    torch.manual_seed(0)
    draws = {"fused": np.stack([torch_fused_qkv(d, seed)[:d] for seed in range(20)])}   # 20 draws: E‖W‖² to ~1%
    draws["separate"] = np.stack([torch.nn.init.xavier_uniform_(torch.empty(d, d, dtype=torch.float64)).numpy()
                                  for _ in range(20)])
    for qkv_init, ref in draws.items():
        layers = dit_params(d, qkv_init, kind_config(n_g, n_t), n_cls, ("q", "attn_out"))
        expected = d * d * ref.var()   # E‖W‖_F² of the dense matrix, from torch's draw
        for role in ("q", "attn_out"):
            layer = layers[role]
            sigma = float(layer["learngene"]["sigma"][0])
            assert float(layer["tailors"]["sigma"][0, 0]) == sigma
            want = expected if role == "q" else d   # attn_out: its own d×d xavier matrix, d²·(1/d)
            assert (n_g + n_t) * sigma ** 2 == pytest.approx(want, rel=0.03), (qkv_init, role)


def test_qkv_init_is_checked():
    config = tiny_config()
    config.model.qkv_init = "thirds"
    with pytest.raises(ConfigError, match="model.qkv_init='thirds': use one of"):
        validate(config, 1)


# ----------------------------------------------------------------------------- FID as ADM's evaluator computes it

def eval_config(tmp_path, reference):
    config = tiny_config()
    weights = tmp_path / "inception.npz"
    weights.write_bytes(b"weights")   # only its presence is checked before sampling
    config.eval.update(reference=str(reference), inception_weights=str(weights))
    return config


def test_fid_defaults_to_adms_preprocessing_and_refuses_mixed_statistics(tmp_path):
    from kindjax.evaluation import adm
    from kindjax.evaluation.pipeline import check_eval_config

    rng = np.random.default_rng(0)
    stats = {k: rng.normal(size=(3,) * (1 + k.startswith("sigma"))) for k in adm.STAT_KEYS}
    np.savez(tmp_path / "adm.npz", **stats)                                        # ADM's: records nothing
    np.savez(tmp_path / "torch.npz", **stats, inception_preprocess="pytorch_fid")  # records its own
    config = eval_config(tmp_path, tmp_path / "adm.npz")
    assert config.eval.inception_preprocess == "tf1"
    assert check_eval_config(config)[1] == set(adm.STAT_KEYS)
    config.eval.inception_preprocess = "pytorch_fid"
    with pytest.raises(ConfigError) as err:
        check_eval_config(config)
    assert "\n" not in str(err.value) and "statistics of the 'tf1' preprocessing but eval.inception_preprocess=" \
        "'pytorch_fid'" in str(err.value)
    config.eval.reference = str(tmp_path / "torch.npz")
    assert check_eval_config(config)[1] == set(adm.STAT_KEYS) | {"inception_preprocess"}
    config.eval.inception_preprocess = "tf1"
    with pytest.raises(ConfigError, match="the 'pytorch_fid' preprocessing but eval.inception_preprocess='tf1'"):
        check_eval_config(config)
    # A reference of images only is computed on the spot, with the config's own preprocessing.
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for preprocess in ("tf1", "pytorch_fid"):
        config.eval.update(reference=str(tmp_path / "images.npz"), inception_preprocess=preprocess)
        assert check_eval_config(config)[1] == {"arr_0"}


def test_feature_files_record_their_preprocessing_and_pooling_refuses_a_mix(tmp_path):
    from kindjax.evaluation.pooled import load_features, pooled_metrics, save_features

    rng = np.random.default_rng(1)

    def features(n):
        return {"pool_3": rng.normal(size=(n, 6)), "spatial": rng.normal(size=(n, 5)),
                "logits_unbiased": rng.normal(size=(n, 4))}

    for name, preprocess in (("a", "tf1"), ("b", "tf1"), ("c", "pytorch_fid")):
        save_features(str(tmp_path / f"{name}.npz"), features(12), preprocess)
    a, b, c = (load_features(str(tmp_path / f"{n}.npz")) for n in "abc")
    assert (a["inception_preprocess"], c["inception_preprocess"]) == ("tf1", "pytorch_fid")
    assert np.isfinite(pooled_metrics([a], [b])["fid"])
    with pytest.raises(ValueError) as err:
        pooled_metrics([a], [b, c])
    assert "\n" not in str(err.value) and "samples 0: 'tf1', reference 1: 'pytorch_fid'" in str(err.value)
    unrecorded = {k: v for k, v in c.items() if k != "inception_preprocess"}
    with pytest.raises(ValueError, match="reference 0: unrecorded"):
        pooled_metrics([a], [unrecorded])


def test_fid_sample_labels_are_drawn_uniformly_by_default():
    """DiT's sample_ddp.py: ``y = torch.randint(0, num_classes, (n,))`` — i.i.d. uniform labels, so class
    counts vary as a multinomial's (χ² test), where ``i mod N`` gives every class exactly n/N."""
    from kindjax.config import base_config
    from kindjax.evaluation.pipeline import sample_labels

    assert base_config().eval.labels == "uniform"
    n, classes = 50_000, 1000
    labels = sample_labels("uniform", n, classes, seed=0)
    counts = np.bincount(labels, minlength=classes)
    assert labels.min() >= 0 and labels.max() < classes and counts.std() > 3   # multinomial: std ≈ √50 ≈ 7
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert not np.array_equal(labels, sample_labels("uniform", n, classes, seed=1))
    np.testing.assert_array_equal(sample_labels("uniform", n, classes, seed=0), labels)
    balanced = sample_labels("balanced", n, classes, seed=0)
    np.testing.assert_array_equal(np.bincount(balanced), np.full(classes, n // classes))
    np.testing.assert_array_equal(balanced[:1003], np.arange(1003) % classes)
    config = tiny_config()
    config.eval.labels = "mod"
    with pytest.raises(ConfigError, match="eval.labels='mod': use one of"):
        validate(config, 1)


# ----------------------------------------------------------------------------- FDD's scale

def dgm_eval_fd(reps1: np.ndarray, reps2: np.ndarray, normalized: bool) -> float:
    """dgm-eval's recipe: ``get_representations(normalized=…)`` (``F.normalize(pred, dim=-1)``), then
    ``compute_FD_with_reps``: np.mean / np.cov statistics and ``scipy.linalg.sqrtm`` of ``Σ1·Σ2``."""
    if normalized:
        reps1, reps2 = (torch.nn.functional.normalize(torch.from_numpy(r), dim=-1).numpy() for r in (reps1, reps2))
    (mu1, s1), (mu2, s2) = ((r.mean(0), np.cov(r, rowvar=False)) for r in (reps1, reps2))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fdd_on_unit_features_is_on_the_scale_of_kind_table_3():
    from kindjax.config import base_config
    from kindjax.evaluation.dinov2 import fdd

    assert base_config().eval.fdd_normalize == "l2"
    rng = np.random.default_rng(2)
    dim, n = 64, 400
    # CLS-like features: a common direction plus spread, norms in the tens (a ViT-L/14's are).
    base = rng.normal(size=dim) * 4
    a = base + rng.normal(size=(n, dim)) * 3
    b = base + 1.5 + rng.normal(size=(n, dim)) * 3.5
    unit, raw = fdd(a, b), fdd(a, b, normalize="none")
    assert unit == pytest.approx(dgm_eval_fd(a, b, normalized=True), rel=1e-6, abs=1e-9)
    assert raw == pytest.approx(dgm_eval_fd(a, b, normalized=False), rel=1e-6)
    assert 0.04 < unit < 0.7 and raw > 100     # Table 3's range against a raw distance in the hundreds
    opposite = fdd(np.tile(base, (n, 1)) + rng.normal(size=(n, dim)) * 1e-3,
                   -np.tile(base, (n, 1)) + rng.normal(size=(n, dim)) * 1e-3)
    assert 3.9 < opposite <= 4.0 + 1e-9       # the bound, 2 − 2·μ_a·μ_b at μ_b = −μ_a, ‖μ‖ = 1
    with pytest.raises(ConfigError, match="eval.fdd_normalize='unit'"):
        fdd(a, b, normalize="unit")


# ----------------------------------------------------------------------------- DiffFit's final setting

def difffit_config(method: str, depth: int = 4, hidden: int = 32, classes: int = 3):
    from kindjax.papers.kind.methods import matched_sizes, method_config

    config = tiny_config()
    config.model.update(hidden_size=hidden, depth=depth, num_heads=2, num_classes=classes, adaln_init="gaussian")
    return method_config(config, method, matched_sizes(classes, 8, 1, hidden, depth), pretrained="<dense>")


@pytest.mark.parametrize("depth", [4, 5])
def test_difffit_trains_the_final_settings_scales_and_the_hand_count(depth):
    """DiffFit §4.5 (Table 4c row 8): BitFit + γ on the blocks' residual branches (Alg. 1), on q, k, v
    (3d) and the attention projection (d) (Alg. 3), in blocks 1→L/2, and on the final layer; lr ×10."""
    from kindjax.papers.kind.accounting import parameter_counts

    d, classes, p, c_out = 32, 3, 2, 2
    final = difffit_config("difffit", depth)
    assert final.optim.lr == pytest.approx(10 * base_config().optim.lr) and final.model.scale_blocks == depth // 2
    biases = depth * (4 * d + 4 * d + d + 6 * d) + d + 2 * d + 2 * d + p * p * c_out   # blocks, x/t embed, final
    labels = (classes + 1) * d
    gammas = depth // 2 * (2 * d + 3 * d + d) + p * p * c_out
    assert parameter_counts(final)[0] == biases + labels + gammas
    assert parameter_counts(difffit_config("difffit_residual", depth))[0] == biases + labels + depth * 2 * d
    # The γ leaves sit where the paper puts them, and only there.
    params = jax.eval_shape(lambda key: init_params(key, build_model(final)), jax.random.key(0))
    for i in range(depth):
        block = params[f"block_{i}"]
        has = {"gamma_attn", "gamma_mlp"} <= set(block) and {"gamma_qkv", "gamma_proj"} <= set(block["attn"])
        assert has == (i < depth // 2) and block.get("gamma_attn", np.ones(1)).shape in ((d,), (1,))
        assert i < depth // 2 or not any("gamma" in k for k in (*block, *block["attn"]))
    assert params["block_0"]["attn"]["gamma_qkv"].shape == (3 * d,)
    assert params["final_layer"]["gamma_out"].shape == (p * p * c_out,)


def test_difffit_scales_act_as_the_equivalent_reparametrisation():
    """γ_qkv ⊙ q = the q matrix (kernel, bias) scaled; γ_proj ⊙ out = attn_out scaled; γ_out ⊙ final =
    the final projection scaled: the γ model with random γ equals the plain model with its matrices
    rescaled, in the loop and in the scan over blocks."""
    final = difffit_config("difffit")
    plain = final.copy_and_resolve_references()
    plain.model.update(attention_scales=False, output_scale=False, residual_scales=False, scale_blocks=0)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    t, y = jnp.asarray([3, 700]), jnp.asarray([0, 2])
    params = jax.jit(lambda key: init_params(key, build_model(final)))(jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(   # random γ, and a live final projection
        lambda path, v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        if "gamma" in jax.tree_util.keystr(path) or "final_layer']['linear']['kernel" in jax.tree_util.keystr(path)
        else v, params)
    rescaled = jax.tree.map(lambda v: v, params)
    for i in range(final.model.depth // 2):
        block, attn = rescaled[f"block_{i}"], rescaled[f"block_{i}"]["attn"]
        g_q, g_k, g_v = np.split(np.asarray(attn.pop("gamma_qkv")), 3)
        for role, g in (("q", g_q), ("k", g_k), ("v", g_v), ("attn_out", np.asarray(attn.pop("gamma_proj")))):
            attn[role] = {k: v * g for k, v in attn[role].items()}
        # γ on the residual branches = the adaLN gate rows α₁, α₂ scaled (chunks 2 and 5 of 6)
        g_attn, g_mlp = np.asarray(block.pop("gamma_attn")), np.asarray(block.pop("gamma_mlp"))
        scale = np.ones(6 * 32)
        scale[2 * 32:3 * 32], scale[5 * 32:6 * 32] = g_attn, g_mlp
        block["adaln_modulation"] = {k: v * scale for k, v in block["adaln_modulation"].items()}
    g_out = np.asarray(rescaled["final_layer"].pop("gamma_out"))
    rescaled["final_layer"]["linear"] = {k: v * g_out for k, v in rescaled["final_layer"]["linear"].items()}
    want = jax.jit(build_model(plain).apply)({"params": rescaled}, x, t, y)
    for scan in (False, True):
        final.model.scan_blocks = scan
        got = jax.jit(build_model(final).apply)({"params": params}, x, t, y)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- FINE downstream: Σ re-learnt per layer

def test_fine_downstream_relearns_sigma_per_layer():
    """FINE's main text: downstream, Σ is re-learnt on limited data with U, V frozen, then everything is
    fine-tuned.  The downstream config runs that Σ-only stage on its own data from random Σ (FINE's
    notes), or from the source's per-layer Σ (``init.sigma_start="copy"``, same depth): either way the
    blocks start with different Σ, where the mean Σ of ``init.fine_sigma="identical"`` gives them a
    spread of exactly 0."""
    import importlib

    from kindjax.papers.fine.jobs import SIGMA_ONLY, fine_init_configs
    from kindjax.papers.fine.transfer import init_from_fine_learngene, layer_sigmas
    from test_fine import fine_model_config, fresh_params, source_fine_params

    downstream = importlib.import_module("configs.fine_downstream").get_config("mri")
    assert downstream.job == "fine_init" and downstream.model.linear.kind == "fine"
    assert (downstream.init.fine_sigma, downstream.init.sigma_start, downstream.init.materialize) == \
        ("trained", "random", False)
    downstream.init.fine_learngene = "/fine_pretraining"
    validate(downstream, 1)
    config = fine_model_config(depth=3)   # the downstream settings on a tiny FINE model of the source's depth
    config.job = downstream.job
    config.init.update({k: downstream.init[k] for k in ("fine_learngene", "fine_sigma", "sigma_start", "materialize")})
    source = source_fine_params(depth=3)
    fresh = fresh_params(build_model(config), 7)

    def start_sigmas(rule):   # the per-layer Σ the start of a stage gives (the fine_learngene start's rule)
        return layer_sigmas(jax.tree.map(np.asarray, init_from_fine_learngene(fresh, source, jax.random.key(1), rule)))

    identical = start_sigmas("identical")
    for sigma_start in ("random", "copy"):
        config.init.sigma_start = sigma_start
        sigma_stage, main = fine_init_configs(config, "/job")
        assert tuple(sigma_stage.train.trainable) == SIGMA_ONLY and sigma_stage.data == config.data
        assert (main.init.fine_learngene, main.init.fine_sigma, main.model.linear.kind) == \
            ("/job/sigma", "copy", "fine")
        start = start_sigmas(sigma_stage.init.fine_sigma)
        for role, sigmas in start.items():
            if sigma_start == "copy":
                np.testing.assert_array_equal(sigmas, layer_sigmas(source)[role])   # the source's own, per layer
            assert np.std(sigmas, axis=0).max() > 0.01 and np.std(identical[role], axis=0).max() == 0.0
    config.init.sigma_start = "mean"
    with pytest.raises(ConfigError, match="init.sigma_start='mean': use one of"):
        validate(config, 1)


def test_fine_drop_path_settings():
    """Supplementary Table 7 (ImageNet factorization: 0.5) and Table 8 (downstream: 0.1); Table 1's
    targets have no source: 0, stated in docs/reproduce.md."""
    import importlib

    for arch in ("b", "l"):
        target = importlib.import_module(f"configs.fine_init_dit_{arch}").get_config("depth_8")
        pretrain = importlib.import_module(f"configs.fine_dit_{arch}").get_config()
        assert (target.model.drop_path, pretrain.model.drop_path) == (0.0, 0.5)
    assert importlib.import_module("configs.fine_downstream").get_config("mri").model.drop_path == 0.1
